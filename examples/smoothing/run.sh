#!/usr/bin/env bash
# Reproduce examples/smoothing/README.md: fine-tune the bundled memorizing digits32 model toward the
# temperature-smoothed empirical denoiser D*_T (T=2), without noise conditioning, and both; each command
# prints the before/after table (original, fine-tuned, closed-form empirical:T=..,k=.. sampler).
# Then a residual-noise check of the samples (is "not memorized" a new digit or a noisy copy?).
# About 10 minutes on 2 CPU cores. Usage: examples/smoothing/run.sh [output folder]
# BANDWIDTH=1 adds the bandwidth-floor runs (about 15 minutes), INVESTIGATE=1 the temperature sweeps (about 5).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
OUT=${1:-/tmp/memaudit-smoothing}
MODEL=examples/models/digits32
DATA=examples/digits/digits32.npz

memaudit smooth "$MODEL" "$DATA" --temperature 2 --k 64 --out "$OUT/smooth-T2"
memaudit smooth "$MODEL" "$DATA" --uncondition --out "$OUT/uncondition"
memaudit smooth "$MODEL" "$DATA" --uncondition --temperature 2 --k 64 --out "$OUT/smooth-T2-uncondition"

python - "$OUT" <<'PY'
"""Memorized fraction next to two quality checks: RMS pixel distance to the nearest training image and
high-frequency (Laplacian) energy; training images plus Gaussian noise calibrate what a noisy copy scores."""
import sys
import torch
import torch.nn.functional as F
from memaudit.data import load_images
from memaudit.metrics.nn_ratio import nn_ratios
from memaudit.models.load import load_model
from memaudit.sampling import SamplerConfig, sample

out = sys.argv[1]
train = load_images("examples/digits/digits32.npz")
laplace = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])[None, None]


def row(name, x):
    nn = nn_ratios(x, train)
    print(f"| {name} | {float((nn.ratio < 1 / 3).float().mean()):.3f} | {float(nn.ratio.mean()):.3f} | "
          f"{float(nn.d1.mean()) / x[0].numel() ** 0.5:.3f} | {float(F.conv2d(x, laplace).pow(2).mean()):.2f} |")


print("| samples (256) | fraction memorized | mean NN ratio | RMS to nearest | HF energy |")
print("|---|---:|---:|---:|---:|")
row("training images", train)
row("held-out real digits", load_images("examples/digits/digits.npz")[32:288])
gen = torch.Generator().manual_seed(0)
for s in (0.1, 0.2, 0.3):
    copies = train[torch.randint(0, 32, (256,), generator=gen)]
    row(f"training image + N(0, {s}^2) noise", copies + s * torch.randn(copies.shape, generator=gen))
for spec, sampler in [("examples/models/digits32", "heun"), ("examples/models/digits32", "sde"),
                      (f"{out}/smooth-T2", "heun"), (f"{out}/uncondition", "sde"), (f"{out}/uncondition", "heun"),
                      (f"{out}/smooth-T2-uncondition", "sde"), ("examples/models/digits-all", "heun")]:
    x, _ = sample(load_model(spec, train=train), 256, SamplerConfig(sampler=sampler), seed=0, batch_size=128)
    row(f"{spec.replace(out + '/', '')} ({sampler})", x)
PY

if [ "${BANDWIDTH:-0}" = 1 ]; then
# Bandwidth floor h (softmax variance max(sigma^2 T, h^2)): fine-tune with T=2, h=1.5 for k = 64, 16, 4,
# h=1.75 for k=64 and h=2 for k=4, then one table for those checkpoints and the closed-form sampler
# empirical:T=2,k=..,h=.. (quality columns as above, plus a digit classifier and how well a blend of the two
# nearest training images explains each sample). About 15 more minutes.
for kh in "64 1.5" "64 1.75" "16 1.5" "4 1.5" "4 2"; do
  set -- $kh
  memaudit smooth "$MODEL" "$DATA" --temperature 2 --k "$1" --bandwidth "$2" --out "$OUT/bandwidth-k$1-h$2"
done
python - "$OUT" <<'PY'
import sys
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from memaudit.data import load_images
from memaudit.metrics.fid import fid_proxy
from memaudit.metrics.nn_ratio import nn_ratios
from memaudit.models.load import load_model
from memaudit.sampling import SamplerConfig, sample

out = sys.argv[1]
train = load_images("examples/digits/digits32.npz")
digits = load_images("examples/digits/digits.npz")
held = digits[32:288]
labels = torch.as_tensor(load_digits().target)  # digits.npz is sklearn's load_digits, in order
classifier = LogisticRegression(max_iter=2000).fit(digits[288:].reshape(-1, 64).numpy(), labels[288:].numpy())
flat = train.reshape(32, -1)
laplace = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]])[None, None]


def row(name, x):
    nn = nn_ratios(x, train)
    xf = x.reshape(len(x), -1)
    two = torch.cdist(xf, flat).topk(2, largest=False).indices
    x1, x2 = flat[two[:, 0]], flat[two[:, 1]]
    a = (((xf - x2) * (x1 - x2)).sum(1) / ((x1 - x2) ** 2).sum(1)).clamp(0, 1)[:, None]
    blend = ((xf - a * x1 - (1 - a) * x2) ** 2).mean(1).sqrt()
    proba = classifier.predict_proba(xf.numpy()).max(1)
    print(f"| {name} | {float((nn.ratio < 1 / 3).float().mean()):.3f} | {float(nn.ratio.mean()):.3f} | "
          f"{float(nn.d1.mean()) / 8:.3f} | {float(F.conv2d(x, laplace).pow(2).mean()):.2f} | "
          f"{fid_proxy(x, train):.2f} | {fid_proxy(x, held):.2f} | {proba.mean():.2f} | {float(blend.mean()):.3f} |")


print("| samples (256, heun) | memorized | mean NN ratio | RMS to nearest | HF energy | FID proxy vs train | "
      "FID proxy vs held-out | classifier confidence | RMS to best blend of 2 nearest |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
row("training images", train)
row("held-out real digits", held)
gen = torch.Generator().manual_seed(0)
row("50/50 blend of two random training images",
    0.5 * (train[torch.randint(0, 32, (256,), generator=gen)] + train[torch.randint(0, 32, (256,), generator=gen)]))
specs = ["examples/models/digits32", "examples/models/digits-all"]
specs += [f"empirical:T=2,k={k},h={h:g}" for k in (4, 16, 64) for h in (0, 1, 1.25, 1.5, 1.75, 2, 3)]
specs += [f"{out}/bandwidth-k{kh}" for kh in ("64-h1.5", "64-h1.75", "16-h1.5", "4-h1.5", "4-h2")]
for spec in specs:
    x, _ = sample(load_model(spec, train=train), 256, SamplerConfig(), seed=0, batch_size=128)
    row(spec.replace(out + "/", "fine-tuned "), x)
PY
fi

[ "${INVESTIGATE:-0}" = 1 ] || exit 0
# Why smoothing does not help: other settings (library API, same seed and scan), and how closely the T=2
# model fits D*_2 vs D*_1 on noisy training points, and the closed-form sampler for several T.
# About 5 more minutes.
python - "$OUT" <<'PY'
import math
import sys
import torch
from memaudit.scan import ScanConfig, run_scan
from memaudit.data import load_images
from memaudit.empirical import EmpiricalDenoiser
from memaudit.finetune import FinetuneConfig, finetune
from memaudit.metrics.fid import fid_proxy
from memaudit.metrics.nn_ratio import nn_ratios
from memaudit.models.load import load_model
from memaudit.sampling import SamplerConfig, sample, sample_batch
from memaudit.training import TrainConfig

out = sys.argv[1]
train = load_images("examples/digits/digits32.npz")
settings = [  # name, T, k, steps, lr, P_mean, P_std
    ("T=8", 8.0, 64, 2000, 2e-4, -1.2, 1.2), ("T=2, k=2", 2.0, 2, 1000, 2e-4, -1.2, 1.2),
    ("T=2, lr 1e-3", 2.0, 64, 1000, 1e-3, -1.2, 1.2),
    ("T=2, sigma ~ exp(N(0.5, 1.0))", 2.0, 64, 1000, 2e-4, 0.5, 1.0),
]


def cells(folder):
    """'memorized / mean NN ratio' of 256 heun and 256 sde samples (seed 0)."""
    out = []
    for sampler in ("heun", "sde"):
        scan = ScanConfig(samplers=(sampler,), skip=("entropy", "cosine", "jacobian"), fid="proxy")
        summary = run_scan(load_model(folder), train, scan, model_info={}, data_info={}).report["summary"]
        out.append(f"{summary['memorized_fraction']:.3f} / {summary['mean_nn_ratio']:.3f}")
    return " | ".join(out)


print("| fine-tuning | steps | heun: memorized / mean NN ratio | sde: memorized / mean NN ratio |")
print("|---|---:|---:|---:|")
print(f"| none (digits32) | 0 | {cells('examples/models/digits32')} |")
print(f"| T=2 (the run above) | 2000 | {cells(out + '/smooth-T2')} |")
for name, t, k, steps, lr, p_mean, p_std in settings:
    config = TrainConfig(steps=steps, batch_size=64, lr=lr, p_mean=p_mean, p_std=p_std, checkpoint_every=0)
    folder = f"{out}/investigate-{t:g}-{k}-{lr:g}-{p_mean:g}"
    finetune(load_model("examples/models/digits32"), train, FinetuneConfig(t, k), config, folder)
    print(f"| {name} | {steps} | {cells(folder)} |")

exact, smoothed = EmpiricalDenoiser(train), EmpiricalDenoiser(train, temperature=2.0, k=64)
models = {"original": load_model("examples/models/digits32"), "smooth T=2": load_model(f"{out}/smooth-T2")}
gen = torch.Generator().manual_seed(0)
x0 = train[torch.randint(0, 32, (512,), generator=gen)]
noise = torch.randn(x0.shape, generator=gen)
print("\n| sigma | max abs D*_2(x, s) - D*_1(x, s sqrt 2) | original: MSE to D*_1 / D*_2 | smooth T=2: MSE to D*_1 / D*_2 |")
print("|---:|---:|---:|---:|")
with torch.no_grad():
    for s in (0.1, 0.3, 0.6, 1.0, 2.0, 4.0):
        sigma, x = torch.full((512,), s), x0 + s * noise
        t1, t2 = exact(x, sigma), smoothed(x, sigma)
        identity = float((t2 - exact(x, sigma * math.sqrt(2))).abs().max())
        mse = [f"{float(((m(x, sigma) - t1) ** 2).mean()):.4f} / {float(((m(x, sigma) - t2) ** 2).mean()):.4f}"
               for m in models.values()]
        print(f"| {s:g} | {identity:.1e} | {mse[0]} | {mse[1]} |")

print("\n| closed-form sampler (heun) | memorized | mean NN ratio | FID proxy | training images hit | most hits |")
print("|---|---:|---:|---:|---:|---:|")


def closed_form_row(name, x):
    nn = nn_ratios(x, train)
    hits = torch.bincount(nn.nearest, minlength=train.shape[0])
    print(f"| {name} | {float((nn.ratio < 1 / 3).float().mean()):.3f} | {float(nn.ratio.mean()):.3f} | "
          f"{fid_proxy(x, train):.2f} | {int((hits > 0).sum())} | {int(hits.max())} |")


for spec in ("empirical:T=1,k=64", "empirical:T=2,k=64", "empirical:T=2,k=2", "empirical:T=4,k=64",
             "empirical:T=8,k=64", "empirical:T=32,k=64"):
    x, _ = sample(load_model(spec, train=train), 256, SamplerConfig(), seed=0, batch_size=128)
    closed_form_row(spec, x)
exact = load_model("empirical", train=train)  # T=1 started sqrt(32) x too narrowly, as T=32 effectively is
exact.sigma_max = 80 * math.sqrt(32)
config = SamplerConfig(sigma_max=exact.sigma_max)
narrow = torch.randn((256, *train.shape[1:]), generator=torch.Generator().manual_seed(0)) / math.sqrt(32)
closed_form_row("empirical (T=1) from N(0, 80^2) at sigma 80 sqrt 32",
                sample_batch(exact, narrow, config, torch.Generator().manual_seed(0)))
PY
