"""torchrun: the ranks of one scan share its sampling batch by batch, and the metrics' row work block by block;
rank 0 measures and writes the report.

`torchrun --nproc_per_node N -m memaudit scan ...` starts N copies of the command (torchrun sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT). Every rank loads the model and the data and walks the scan's sampling
runs in the same order. Rank 0 opens each round of a run with a broadcast of its first batch (after the batches it
resumed) and closes the run with Done; batch k is drawn by rank k mod N from its own generator
(memaudit.sampling.batch_generator), and each round's batches are gathered on rank 0 in batch order, so the
samples, and the report, are the same for any N. Only rank 0 saves batches and writes the reports; the metrics'
per-sample work (nearest training images, entropy and D* along the trajectories: memaudit.shared_rows) is a Call
that rank 0 broadcasts, then scatters the blocks of rows (block b to rank b mod N) and gathers the results; a
worker answers Calls wherever it waits for rank 0. When rank 0 exits it broadcasts its exit code, and every rank
exits with it (a worker waiting for a run that never comes learns the code instead). Collectives use gloo on CPU
objects, for CPU and GPU ranks alike.

The first collective of a job is agree(): every rank sends digests of what it loaded (data, model, settings), or,
from finish(), that it failed before getting there, so a rank that stops early or loaded another training set
stops the whole job with exit 2 instead of leaving the others waiting on a collective it never joins.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from memaudit.errors import UserError
from memaudit.sampling import Batch, BatchPlan, draw_batch, local_batches

DEFAULT_TIMEOUT_S = 6 * 3600  # rank 0 may measure for hours while the others wait for the next run
ENV_TIMEOUT = "MEMAUDIT_DIST_TIMEOUT"


@dataclass(frozen=True)
class Round:
    """Rank 0 to all: draw the round of batches starting at batch `first` (batch first + r on rank r)."""

    first: int


@dataclass(frozen=True)
class Done:
    """Rank 0 to all: this sampling run is complete."""


@dataclass(frozen=True)
class Stop:
    """Rank 0 to all: the command is over; exit with `code`."""

    code: int


@dataclass(frozen=True)
class Call:
    """Rank 0 to all: compute the row work `name` (memaudit.shared_rows.ROW_WORK) with `args` on the blocks of
    rows scattered next (block b to rank b mod N); the results are gathered on rank 0."""

    name: str
    args: tuple


@dataclass(frozen=True)
class Failed:
    """A rank to rank 0, in place of its batch: drawing it raised (`message`; `user`: a UserError)."""

    message: str
    user: bool


class Stopped(Exception):
    """Raised on a worker rank when rank 0 stopped the command: exit with `code`."""

    def __init__(self, code: int):
        super().__init__(f"rank 0 stopped with exit code {code}")
        self.code = code


def world_size() -> int:
    """The number of torchrun ranks of this command (1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes") from None


def active() -> bool:
    """Whether this process is one rank of several (and the process group is up)."""
    return world_size() > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that measures and writes."""
    return rank() == 0


def start() -> None:
    """Join the torchrun job (gloo) when WORLD_SIZE > 1; a one-line error when its settings are missing."""
    if world_size() == 1 or active():
        return
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise UserError(f"WORLD_SIZE is {world_size()} but {', '.join(missing)} is not set: start several ranks "
                        "with torchrun --nproc_per_node N -m memaudit scan ...")
    timeout = float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S))
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))


_agreed = False  # whether this rank has taken part in agree() (every rank does, once, before the scan)


def agree(fingerprint: dict) -> None:
    """Every rank, before the scan's first other collective: check that the ranks loaded the same thing
    (`fingerprint`: digests of the data, the model and the settings) and that none failed before it. A rank
    whose data or model differs would answer rank 0's row work from its own copy: the report would mix two
    training sets and could pass a gate that one process fails. UserError on every rank when they differ;
    when a rank failed first (it takes part from finish()), rank 0 says which, and the others stop with it."""
    if not active():
        return
    statuses = _gather_status(("ok", fingerprint))
    failed = [(r, status[1]) for r, status in enumerate(statuses) if status[0] != "ok"]
    if failed:
        if not is_main():
            raise Stopped(_expect_stop())
        where, code = failed[0]
        message = f"torchrun rank {where} stopped before the scan began (exit {code}): see its error above"
        raise UserError(message) if code == 2 else RuntimeError(message)
    differ = sorted(k for k in fingerprint if any(status[1].get(k) != fingerprint[k] for status in statuses))
    if differ:
        ranks = [r for r, status in enumerate(statuses) if status[1] != statuses[0][1]]
        raise UserError(f"torchrun ranks {', '.join(map(str, ranks))} loaded another {' and '.join(differ)} than "
                        "rank 0: every rank must load the same model, data and settings (a stale copy on one "
                        "node?)")


def _gather_status(status: tuple) -> list:
    global _agreed
    _agreed = True
    statuses: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(statuses, status)
    return statuses


def finish(code: int) -> int:
    """The command's exit code on every rank: rank 0 broadcasts its own; a worker that finished its runs waits
    for it. A rank that stopped before agree() takes part in it first, as failed. Leaves the process group.
    A lost peer or an interrupt here keeps this rank's own code (nothing is left to coordinate)."""
    if not active():
        return code
    try:
        if not _agreed:
            _gather_status(("failed", int(code)))
        if is_main():
            _broadcast(Stop(int(code)))
        else:
            code = _expect_stop(code)
    except (RuntimeError, KeyboardInterrupt):  # gloo's "connection closed by peer", Ctrl-C while waiting
        pass
    finally:
        leave()
    return code


def leave() -> None:
    """Leave the process group (after rank 0's Stop)."""
    if active():
        torch.distributed.destroy_process_group()


def _expect_stop(code: int = 3) -> int:
    """A worker's wait for rank 0's Stop: its code (or `code` when rank 0 sends anything else)."""
    message = _next_order()
    return message.code if isinstance(message, Stop) else code


def local_device(device: str) -> str:
    """`cuda` on a torchrun rank means that rank's own GPU (cuda:LOCAL_RANK)."""
    if active() and device == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def _broadcast(message):
    box = [message]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def batch_source() -> Callable[..., Iterator[Batch]]:
    """The BatchSource of memaudit.sampling.sample: this process alone, or the torchrun ranks together."""
    return shared_batches if active() else local_batches


def shared_batches(denoiser, plan: BatchPlan, first: int, device: torch.device,
                   nearest: Optional[Callable[[Tensor], Tensor]] = None) -> Iterator[Batch]:
    """The plan's batches from `first` on, drawn round by round (batch k by rank k mod N) and gathered in
    batch order; yielded on rank 0 only. Rank 0 opens each round with a broadcast (Round, then Done), so a
    worker waiting on it learns of a Stop at once, wherever rank 0 stopped."""
    if is_main():
        yield from _lead(denoiser, plan, first, device, nearest)
    else:
        _follow(denoiser, plan, device, nearest)


def _lead(denoiser, plan: BatchPlan, first: int, device, nearest) -> Iterator[Batch]:
    size = torch.distributed.get_world_size()
    for round_start in range(first, plan.num_batches, size):
        _broadcast(Round(round_start))
        gathered = [None] * size
        torch.distributed.gather_object(_draw(denoiser, plan, round_start, device, nearest), gathered, dst=0)
        batches = gathered[: plan.num_batches - round_start]
        for item in batches:
            if isinstance(item, Failed):
                raise UserError(item.message) if item.user else RuntimeError(item.message)
        yield from batches
    _broadcast(Done())


def _follow(denoiser, plan: BatchPlan, device, nearest) -> None:
    me = rank()
    while True:
        message = _next_order()
        if isinstance(message, Stop):
            raise Stopped(message.code)
        if isinstance(message, Done):
            return
        k = message.first + me
        mine = _draw(denoiser, plan, k, device, nearest) if k < plan.num_batches else None
        torch.distributed.gather_object(mine, None, dst=0)


def _draw(denoiser, plan: BatchPlan, k: int, device, nearest):
    """Batch k, or Failed when drawing it raised (every rank must still reach the gather)."""
    return _attempt(draw_batch, denoiser, plan, k, device, nearest)


def _attempt(fn: Callable, *args):
    """fn(*args), or Failed when it raised (a UserError as a user error, anything else as an internal one)."""
    try:
        return fn(*args)
    except UserError as exc:
        return Failed(str(exc), True)
    except Exception as exc:  # noqa: BLE001 - reported by rank 0 as an internal error
        return Failed(f"rank {rank()}: {type(exc).__name__}: {exc}", False)


# A worker's handler of rank 0's Calls: (name, blocks, args) -> one result per block (memaudit.shared_rows)
RowWork = Callable[[str, list, tuple], list]
_row_work: Optional[RowWork] = None


def serving(work: Optional[RowWork]) -> None:
    """Set this worker's handler of rank 0's Calls, answered wherever the worker waits for rank 0."""
    global _row_work
    _row_work = work


def share_rows(name: str, args: tuple, blocks: list, work: RowWork) -> list:
    """Rank 0: `work`'s result on every block (CPU tensors), block b computed by rank b mod N, in block order.
    A rank's failure is raised here (a UserError as one, anything else as an internal error)."""
    size = torch.distributed.get_world_size()
    _broadcast(Call(name, args))
    mine: list = [None]
    torch.distributed.scatter_object_list(mine, [blocks[r::size] for r in range(size)], src=0)
    gathered: list = [None] * size
    torch.distributed.gather_object(_attempt(work, name, mine[0], args), gathered, dst=0)
    out: list = [None] * len(blocks)
    for r, part in enumerate(gathered):
        if isinstance(part, Failed):
            raise UserError(part.message) if part.user else RuntimeError(part.message)
        out[r::size] = part
    return out


def _next_order():
    """A worker's next message from rank 0 that is not a Call, answering every Call before it."""
    while True:
        message = _broadcast(None)
        if not isinstance(message, Call):
            return message
        mine: list = [None]
        torch.distributed.scatter_object_list(mine, None, src=0)
        answer = (_attempt(_row_work, message.name, mine[0], message.args) if _row_work is not None
                  else Failed(f"rank {rank()} has no row work to answer {message.name!r} with", False))
        torch.distributed.gather_object(answer, None, dst=0)

