"""The seed paper's grid on the bundled digits (issue 9): temperature schedules x K x unconditioning, fine-tuned and
trained from scratch, on 32 and on 256 training images; each row scanned with an ODE and an SDE sampler.

    python examples/smoothing/grid.py OUT [--sets 32 256] [--finetune-steps 2000] [--scratch-steps 6000]
                                          [--base-steps 6000]

Checkpoints and per-row results are kept in OUT (a rerun skips what is done), and the Markdown tables are
printed at the end (examples/smoothing/README.md holds them). Quality is the pixel-PCA FID proxy against 797
held-out digits (digits 1000-1796), never against the training set, which rewards copies. The target's weight
entropy is measured on the target itself (independent of training): the mean entropy of the power-law weights
of pairs (mu, mu + sigma n) at a few noise levels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from memaudit.data import load_images  # noqa: E402
from memaudit.empirical import EmpiricalDenoiser  # noqa: E402
from memaudit.metrics.fid import fid_proxy  # noqa: E402
from memaudit.metrics.nn_ratio import NN_RATIO_THRESHOLD, memorized, nn_ratios  # noqa: E402
from memaudit.models.load import load_model  # noqa: E402
from memaudit.sampling import SamplerConfig, sample  # noqa: E402
from memaudit.smoothing.knn_graph import knn_graph  # noqa: E402
from memaudit.smoothing.power_law import parse_temperature, weight_entropy  # noqa: E402

SCHEDULES = ("2", "2/sigma", "14/sigma")  # a constant T; the paper's T = 1/sigma and 7/sigma in memaudit's units
KS = (10, 30, 100)
ENTROPY_SIGMAS = (0.02, 0.1, 0.5, 2.0)
SAMPLES = 256


def sh(*args: str) -> None:
    """Run a memaudit command (the CLI, as a user would)."""
    subprocess.run(["memaudit", *args], check=True)


def target_entropy(train: torch.Tensor, schedule: str, k: int, seed: int = 0) -> list[float]:
    """Mean weight entropy (nats) of the power-law target over pairs (mu, mu + sigma n), per ENTROPY_SIGMAS."""
    sched = parse_temperature(schedule)
    graph = knn_graph(train, k)
    flat = train.reshape(len(train), -1).double()
    g = torch.Generator().manual_seed(seed)
    out = []
    for sigma in ENTROPY_SIGMAS:
        x = flat + sigma * torch.randn(flat.shape, generator=g, dtype=torch.float64)
        s = torch.full((len(flat),), sigma, dtype=torch.float64)
        h = weight_entropy(x, flat[graph], sched.temperature(s))
        out.append(float(h.mean()) if sigma <= sched.collapse else 0.0)
    return out


def measure(spec: str, train: torch.Tensor, held_out: torch.Tensor, samplers: tuple[str, ...]) -> dict:
    """Fraction memorized and held-out FID proxy per sampler, 256 samples, seed 0."""
    model = load_model(spec, train=train)
    nearest = EmpiricalDenoiser(train).nearest_distance
    out = {}
    for name in samplers:
        x, _ = sample(model, SAMPLES, SamplerConfig(sampler=name), seed=0, batch_size=128, nearest=nearest)
        out[name] = {"memorized": memorized(nn_ratios(x, train).ratio.numpy(), NN_RATIO_THRESHOLD),
                     "holdout_proxy": fid_proxy(x, held_out)}
    return out


def run_grid(out: Path, size: int, finetune_steps: int, scratch_steps: int, base_steps: int,
             schedules=SCHEDULES, modes=("finetune", "scratch"), report_only: bool = False) -> list[dict]:
    data = out / f"digits{size}.npz"
    with np.load(ROOT / "examples" / "digits" / "digits.npz") as npz:
        digits = npz["images"]
    if not data.exists():
        np.savez(data, images=digits[:size])
    held = out / "holdout.npz"
    if not held.exists():
        np.savez(held, images=digits[1000:])
    train, held_out = load_images(data), load_images(held)
    base = out / f"base{size}"  # the model the fine-tuning rows start from: unsmoothed, conditioned
    if size == 32:
        base = ROOT / "examples" / "models" / "digits32"  # 6000 steps on these 32 digits (it memorizes)
    elif not report_only and (not (base / "model.safetensors").exists()
                              or (base / "training_state.pt").exists()):  # absent or unfinished
        sh("train", str(data), "--out", str(base), "--steps", str(base_steps), "--seed", "1", "--quiet")
    rows = []
    ks = [k for k in KS if k < size]  # K = 100 on 32 images is K = 32, all of them: the row would repeat K = 30
    settings = [(None, None, False), (None, None, True)] + [(t, k, u) for t in schedules for k in ks
                                                            for u in (False, True)]
    for mode in modes:
        for schedule, k, uncond in settings:
            name = f"{mode}-{schedule or 'plain'}-{k or 0}-{'u' if uncond else 'c'}".replace("/", "_")
            folder, result = out / f"{size}" / name, out / f"{size}" / f"{name}.json"
            if result.exists():
                rows.append(json.loads(result.read_text()))
                continue
            if report_only:
                continue
            flags = (["--temperature", schedule, "--k", str(k)] if schedule else []) + \
                (["--uncondition"] if uncond else [])
            finished = (folder / "model.safetensors").exists() and not (folder / "training_state.pt").exists()
            resume = ["--resume"] if (folder / "training_state.pt").exists() else []  # an interrupted run
            if mode == "finetune" and not flags:
                spec = str(base)  # the unsmoothed baseline itself
            elif mode == "finetune":
                if not finished:
                    sh("smooth", str(base), str(data), "--out", str(folder), *flags, "--steps", str(finetune_steps),
                       "--no-compare", "--quiet", *resume)
                spec = str(folder)
            else:
                if not finished:
                    sh("train", str(data), "--out", str(folder), *flags, "--steps", str(scratch_steps), "--seed",
                       "1", "--quiet", *resume)
                spec = str(folder)
            samplers = ("heun", "sde", "pc") if uncond else ("heun", "sde")
            row = {"set": size, "mode": mode, "schedule": schedule or "none", "k": k,
                   "uncondition": uncond, "scan": measure(spec, train, held_out, samplers),
                   "entropy": target_entropy(train, schedule, k) if schedule else None}
            result.parent.mkdir(parents=True, exist_ok=True)
            result.write_text(json.dumps(row, indent=1))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per row, the best setting marked."""
    lines = ["| set | mode | T | K | uncond. | memorized ODE (heun) | memorized SDE | (pc) | held-out proxy ODE | "
             "held-out proxy SDE | target entropy at sigma " + "/".join(map(str, ENTROPY_SIGMAS)) + " (nats) |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        s = r["scan"]
        ent = "/".join(f"{v:.2f}" for v in r["entropy"]) if r["entropy"] else "-"
        pc = f"{s['pc']['memorized']:.3f}" if "pc" in s else "-"
        lines.append(f"| {r['set']} | {r['mode']} | {r['schedule']} | {r['k'] or '-'} | "
                     f"{'yes' if r['uncondition'] else 'no'} | {s['heun']['memorized']:.3f} | "
                     f"{s['sde']['memorized']:.3f} | {pc} | {s['heun']['holdout_proxy']:.3f} | "
                     f"{s['sde']['holdout_proxy']:.3f} | {ent} |")
    return "\n".join(lines)


def best(rows: list[dict]) -> str:
    """The lowest memorized fraction (the worse of ODE and SDE) whose held-out proxy (the worse of the two) is
    within 10% of the unsmoothed model of its set and mode."""
    out = []
    for size in sorted({r["set"] for r in rows}):
        for mode in ("finetune", "scratch"):
            group = [r for r in rows if r["set"] == size and r["mode"] == mode]
            base = next((r for r in group if r["schedule"] == "none" and not r["uncondition"]), None)
            if base is None:
                continue
            worst = lambda r, key: max(v[key] for v in r["scan"].values() if v)  # noqa: E731
            limit = 1.1 * worst(base, "holdout_proxy")
            fine = [r for r in group if worst(r, "holdout_proxy") <= limit]
            pick = min(fine, key=lambda r: worst(r, "memorized"))
            out.append(f"- {size} images, {mode}: baseline memorized {worst(base, 'memorized'):.3f}, held-out proxy "
                       f"{worst(base, 'holdout_proxy'):.3f} (limit {limit:.3f}); best: T={pick['schedule']}, "
                       f"K={pick['k']}, uncondition={pick['uncondition']}: memorized {worst(pick, 'memorized'):.3f}, "
                       f"proxy {worst(pick, 'holdout_proxy'):.3f}"
                       + ("" if pick is not base else " (nothing beats the unsmoothed model)"))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--sets", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--finetune-steps", type=int, default=2000)
    parser.add_argument("--scratch-steps", type=int, default=6000)
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES))
    parser.add_argument("--report-only", action="store_true", help="print the tables of the rows done; train nothing")
    parser.add_argument("--modes", nargs="+", default=["finetune", "scratch"], choices=["finetune", "scratch"])
    parser.add_argument("--base-steps", type=int, default=6000, help="training steps of the fine-tuning rows' "
                        "starting model (32 images: the bundled examples/models/digits32, 6000 steps)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [r for size in args.sets
            for r in run_grid(args.out, size, args.finetune_steps, args.scratch_steps, args.base_steps,
                              tuple(args.schedules), tuple(args.modes), args.report_only)]
    print(table(rows))
    print()
    print(best(rows))


if __name__ == "__main__":
    main()
