"""A rank of a small torchrun-like job for tests/test_distributed.py (run as a script with RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT set): samples a closed-form model through memaudit.distributed and, on rank 0, saves
what it drew; or (scenarios 'rows', 'rows-fail') shares row work through memaudit.shared_rows.map_rows.
argv: scenario ('plain', 'resume', 'fail', 'rows' or 'rows-fail') and the output file."""

from __future__ import annotations

import sys

import torch

from memaudit import distributed
from memaudit.errors import UserError
from memaudit import shared_rows
from memaudit.sampling import SamplerConfig, local_batches, sample

N, BATCH, STEPS, SEED = 10, 3, 4, 7  # 4 batches over the ranks: the last round is not full


class Shrink(torch.nn.Module):
    """D(x, sigma) = x / (1 + sigma^2): the denoiser of N(0, I) data (closed form)."""

    image_shape = (1, 2, 2)
    sigma_min, sigma_max = 0.002, 80.0
    device = torch.device("cpu")

    def __init__(self, fail_on_rank: int = -1):
        super().__init__()
        self.fail_on_rank = fail_on_rank

    def forward(self, x, sigma):
        if distributed.rank() == self.fail_on_rank:
            raise UserError(f"rank {self.fail_on_rank} could not draw its batch")
        return x / (1 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) ** 2)


def saved_prefix(model, config):
    """The first batch of a one-process run: what an interrupted scan left in its work folder."""
    plan_batches = []
    sample(model, N, config, seed=SEED, batch_size=BATCH, record=4, on_batch=plan_batches.append,
           source=local_batches)
    return plan_batches[:1]


ROWS, ROW_BATCH = 10, 3  # 4 blocks over the ranks


def tag_rows(state, rows, factor, fail_on_rank=-1):
    """Row work for the test: each row times `factor`, and the rank that computed it."""
    if distributed.rank() == fail_on_rank:
        raise UserError(f"rank {fail_on_rank} could not do its rows")
    return rows * factor, torch.full((rows.shape[0],), distributed.rank())


def share_rows(out: str, fail_on_rank: int) -> None:
    """Rank 0 maps tag_rows over ROWS rows and saves what came back; the other ranks answer."""
    shared_rows.ROW_WORK["tag"] = tag_rows
    if not distributed.is_main():
        distributed.serving(lambda name, blocks, args: shared_rows.compute_blocks(None, name, blocks, args))
        return
    rows = torch.arange(float(ROWS)).reshape(ROWS, 1)
    values, ranks = shared_rows.map_rows(None, "tag", (rows,), (2.0, fail_on_rank), batch_size=ROW_BATCH)
    torch.save({"values": values, "ranks": ranks}, out)


def main(scenario: str, out: str) -> int:
    distributed.start()
    distributed.agree({"scenario": scenario})  # the first collective of every job (memaudit.distributed)
    if scenario.startswith("rows"):
        try:
            share_rows(out, 1 if scenario == "rows-fail" else -1)
        except UserError as exc:
            open(out, "w").write(str(exc))
            return distributed.finish(2)
        return distributed.finish(0)
    config = SamplerConfig(sampler="euler", steps=STEPS)
    model = Shrink(fail_on_rank=1 if scenario == "fail" else -1)
    code = 0
    try:
        batches = saved_prefix(model, config) if scenario == "resume" and distributed.is_main() else []
        samples, trajs = sample(model, N, config, seed=SEED, batch_size=BATCH, record=4, batches=batches,
                                source=distributed.batch_source())
        if distributed.is_main():
            torch.save({"samples": samples, "trajectories": [torch.stack(t.xs) for t in trajs]}, out)
    except UserError as exc:
        if distributed.is_main():
            open(out, "w").write(str(exc))
        code = 2
    except distributed.Stopped as exc:
        distributed.leave()
        return exc.code
    return distributed.finish(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
