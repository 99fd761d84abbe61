"""`memaudit scan MODEL DATA`: sample, measure memorization, attach the gates, print/write reports, exit 0/1/2."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from memaudit import distributed
from memaudit.atomic import check_distinct_paths, check_writable
from memaudit.cli import options as opt
from memaudit.data import load_dataset, parse_value_range
from memaudit.errors import UserError
from memaudit.fingerprints import data_fingerprint, model_fingerprint
from memaudit.imagecache import OFF
from memaudit.gates import check_gate_metrics, exit_code, parse_gates
from memaudit.indexes import is_approximate
from memaudit.latent_scan import run_latent_scan
from memaudit.metrics import summary_keys
from memaudit.models.latent import is_latent
from memaudit.progress import data_loading, progress_tracker
from memaudit.report import attach_gates, print_summary, write_html, write_json, write_junit
from memaudit.report.html import check_html_folder
from memaudit.scan import ScanConfig, dry_run as plan_scan, run_scan

DEFAULTS = ScanConfig()


def default_workdir() -> Optional[Path]:
    """Where interrupted scans keep their samples: $MEMAUDIT_CACHE or $XDG_CACHE_HOME/memaudit/scans; None
    (no resume) for MEMAUDIT_CACHE=off, which also turns the image cache off (memaudit.imagecache)."""
    if os.environ.get("MEMAUDIT_CACHE"):
        if os.environ["MEMAUDIT_CACHE"].strip().lower() in OFF:
            return None
        return Path(os.environ["MEMAUDIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memaudit" / "scans"


def scan(
    model: str = typer.Argument(..., metavar="MODEL", help="Checkpoint (folder or file), or empirical[:T=..,k=..]."),
    data: Path = typer.Argument(..., metavar="DATA", help="Training images: a folder, .npy or .npz."),
    samples: int = typer.Option(DEFAULTS.num_samples, "--samples", "-n", min=1, help="Samples per sampler."),
    sampler: List[opt.SamplerName] = typer.Option(list(DEFAULTS.samplers), "--sampler",
                                                  help="Sampler; repeat for several."),
    steps: int = typer.Option(DEFAULTS.steps, "--steps", min=1, help="Sampler steps (Karras schedule)."),
    batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", min=1, help="Samples per batch."),
    threshold: float = typer.Option(DEFAULTS.threshold, "--threshold", show_default="1/3",
                                    help="NN ratio d1/d2 below this = memorized."),
    topk: int = typer.Option(DEFAULTS.topk, "--topk", help="K for the top-K entropy of the empirical weights."),
    features: Optional[str] = opt.FEATURES,
    fid: opt.FidMode = typer.Option(DEFAULTS.fid, "--fid", help="Quality score: clean-fid's FID, the offline proxy, "
                                                               "both when clean-fid is present (auto), or none."),
    skip: List[opt.SkipName] = typer.Option([], "--skip", help="Skip a metric (its section name; cosine = both "
                                                                "cosine sections)."),
    fail_on: List[str] = typer.Option([], "--fail-on", help="Gate, e.g. 'memorized_fraction>0.01': exit 1 if true."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the JSON report here."),
    html_out: Optional[Path] = typer.Option(None, "--html", help="Write an HTML/Markdown report folder here."),
    junit_out: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted scan from its saved samples."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Folder for resumable samples (default: user cache)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use only the first N training images."),
    value_range: Optional[str] = opt.VALUE_RANGE,
    dup_tol: float = typer.Option(DEFAULTS.dup_tol, "--dup-tol", help="Training images closer than this "
                                  "fraction of the RMS distance between two random training images are "
                                  "near-duplicates (d2 is measured to the nearest distinct image); 0: exact copies only."),
    holdout: Optional[Path] = typer.Option(None, "--holdout", metavar="DATA2", help="Held-out real images (never "
                                           "trained on): calibrate the NN-ratio rule (its false-positive rate, a "
                                           "threshold at --fpr) and compute Meehan's C_T."),
    fpr: float = typer.Option(DEFAULTS.fpr, "--fpr", help="Target false-positive rate of the calibrated threshold."),
    match_flips: bool = typer.Option(False, "--match-flips", help="Also match each sample's mirror image (models "
                                     "trained with x-flip can emit mirrored copies): d = min over the transforms."),
    match_shifts: int = typer.Option(0, "--match-shifts", metavar="N", help="Also match shifts by up to N pixels "
                                     "(with --match-flips, of the mirror image too)."),
    index: str = typer.Option(DEFAULTS.index, "--index", metavar="KIND", help="Neighbour search: exact (faiss), ivf "
                              "(faiss IVF for millions of images; ivf:nlist=N,nprobe=P) or torch (GEMMs on --device; "
                              "torch:dtype=bf16). An approximate index's recall is measured on the samples and a "
                              "recall under --min-recall fails the scan."),
    min_recall: float = typer.Option(DEFAULTS.min_recall, "--min-recall", help="With an approximate --index: the recall@1 "
                                     "below which the scan fails (exit 1)."),
    param: Optional[opt.ParamName] = opt.PARAM,
    schedule: Optional[opt.ScheduleName] = opt.SCHEDULE,
    factory: Optional[str] = opt.FACTORY,
    factory_args: Optional[str] = opt.FACTORY_ARGS,
    trust_pickle: bool = opt.TRUST_PICKLE,
    sigma_min: Optional[float] = opt.SIGMA_MIN,
    sigma_max: Optional[float] = opt.SIGMA_MAX,
    round_timesteps: bool = opt.ROUND_TIMESTEPS,
    model_config: Optional[str] = opt.MODEL_CONFIG,
    vae: Optional[Path] = opt.VAE,
    latent_scale: Optional[float] = opt.LATENT_SCALE,
    num_classes: Optional[int] = opt.NUM_CLASSES,
    resize: Optional[int] = opt.RESIZE,
    channels: Optional[int] = opt.CHANNELS,
    seed: int = opt.SEED,
    device: str = opt.DEVICE,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print each phase's predicted FLOPs, memory and seconds "
                                 "(from this machine's measured rates) and stop: nothing is sampled."),
    cache_dir: Optional[str] = opt.CACHE_DIR,
    quiet: bool = opt.QUIET,
) -> int:
    """Audit MODEL for memorization of the training images DATA."""
    distributed.start()  # under torchrun: join the job (memaudit.distributed); else nothing
    device, quiet = distributed.local_device(device), quiet or not distributed.is_main()
    sampler, skip = opt.values(sampler), opt.values(skip)
    gates = parse_gates(fail_on) + recall_gate(index, min_recall)
    check_gate_metrics(gates, summary_keys(sampler))
    config = ScanConfig(num_samples=samples, samplers=tuple(sampler), steps=steps, seed=seed, batch_size=batch_size,
                        threshold=threshold, topk=topk, features=features, fid=fid, device=device, skip=tuple(skip),
                        sigma_min=sigma_min, sigma_max=sigma_max, dup_tol=dup_tol,
                        match_flips=match_flips, match_shifts=match_shifts, fpr=fpr, index=index,
                        min_recall=min_recall)
    config.validate()
    if dry_run:
        check_dry_run(fail_on, json_out, html_out, junit_out, resume)
        if distributed.active():
            raise UserError("--dry-run plans one process; run it without torchrun")
    check_distinct_paths(inputs={"MODEL": model, "DATA": data, **({"--holdout": holdout} if holdout else {})},
                         outputs={"--json": json_out, "--junit": junit_out, "--html": html_out})
    check_outputs(json_out, html_out, junit_out)  # now, not after a long scan
    dev = opt.resolve_device(device)
    with data_loading("load DATA", quiet) as reporting:
        dataset = load_dataset(data, resize=resize, channels=channels, limit=limit,
                               value_range=parse_value_range(value_range), cache_dir=cache_dir, **reporting)
    train = dataset.data  # a float32 tensor, or a uint8 ImageStore for a large 8-bit set (memaudit.storage)
    if train.shape[0] < 2:
        raise UserError(f"{data} holds {train.shape[0]} image; the NN ratio needs at least 2 training images")
    root = None if dry_run else work_folder(workdir, quiet)
    denoiser = opt.load_checked_model(model, train.to(dev), dev, param=param, schedule=schedule, factory=factory,
                                      trust_pickle=trust_pickle, sigma_min=sigma_min, sigma_max=sigma_max,
                                      round_timesteps=round_timesteps, model_config=model_config,
                                      factory_args=factory_args, vae=vae, latent_scale=latent_scale,
                                      latent_cache=root, num_classes=num_classes)
    data_info = {"path": str(data), "num_images": int(train.shape[0]), "image_shape": list(train.shape[1:]),
                 "value_range": dataset.value_range}
    held = None
    if holdout is not None:
        with data_loading("load --holdout", quiet) as reporting:
            held = load_dataset(holdout, resize=resize, channels=channels, value_range=parse_value_range(value_range),
                                cache_dir=cache_dir, **reporting).images
        data_info["holdout"] = {"path": str(holdout), "num_images": int(held.shape[0])}
    if dry_run:
        if is_latent(denoiser):
            raise UserError("--dry-run does not model latent scans yet (encoding, decoding); drop --dry-run")
        for line in plan_scan(denoiser, train, config, holdout=held):
            Console().print(line, markup=False, highlight=False)
        return 0
    distributed.agree(rank_fingerprint(train, denoiser, held, config))  # under torchrun: the same on every rank
    notes = Console(stderr=True)
    runner = run_latent_scan if is_latent(denoiser) else run_scan
    try:
        with progress_tracker(quiet=quiet) as tracker:
            classes = {} if is_latent(denoiser) else {  # latent models are unconditional (UNet2DModel)
                "labels": dataset.labels, "class_names": dataset.class_names, "labels_problem": dataset.labels_problem}
            result = runner(denoiser, train, config, model_info=opt.model_info(model, denoiser),
                            data_info=data_info, task=tracker.task, workdir=root, resume=resume, holdout=held,
                            note=lambda line: notes.print(opt.printable(line), markup=False, highlight=False),
                            **classes)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted; the samples drawn so far are saved: run the same command with "
                                "--resume to continue") from None
    if result is None:  # a torchrun rank other than 0: it drew its share of the samples; rank 0 reports
        return 0
    attach_gates(result.report, gates)
    write_outputs(result, train, json_out, html_out, junit_out)
    if result.workdir is not None:
        shutil.rmtree(result.workdir, ignore_errors=True)  # only once every report is written
    print_summary(result.report, Console())
    return exit_code(result.report["status"])


def rank_fingerprint(train, denoiser, held, config: ScanConfig) -> Optional[dict]:
    """What every torchrun rank must have loaded alike: digests of the training images, the model's weights,
    the held-out images and the settings (but the device: cuda means each rank's own GPU). None in one process
    (nothing to compare, nothing hashed)."""
    if not distributed.active():
        return None
    settings = {k: v for k, v in config.settings().items() if k != "device"}
    return {"data": data_fingerprint(train), "model": model_fingerprint(denoiser),
            "held-out data": data_fingerprint(held) if held is not None else None,
            "settings": json.dumps(settings, sort_keys=True, default=str)}


def recall_gate(index: str, min_recall: float) -> list:
    """With an approximate index, the automatic gate that fails the scan when its measured recall is too low
    (a missed neighbour undercounts copies: fail closed)."""
    if not (math.isfinite(min_recall) and 0.0 <= min_recall <= 1.0):
        raise UserError(f"--min-recall must be a recall in [0, 1], not {min_recall!r}")
    return parse_gates([f"index_recall<{min_recall!r}"]) if is_approximate(index) else []


def check_dry_run(fail_on, json_out, html_out, junit_out, resume: bool) -> None:
    """UserError when --dry-run comes with what needs a measurement: a dry run must never pass a gate."""
    clashes = [name for name, value in (("--fail-on", fail_on), ("--json", json_out), ("--html", html_out),
                                        ("--junit", junit_out), ("--resume", resume)) if value]
    if clashes:
        raise UserError(f"--dry-run measures nothing, so it cannot be combined with {', '.join(clashes)}; "
                        "drop --dry-run to run the scan")


def work_folder(workdir: Optional[Path], quiet: bool) -> Optional[Path]:
    """--workdir (checked now), else the default cache folder, or None (no resume) when that is not writable."""
    if workdir is not None:
        check_writable(workdir, folder=True)
        return workdir
    root = default_workdir()
    if root is None:
        return None
    try:
        check_writable(root, folder=True)
    except UserError as exc:
        if not quiet:
            Console(stderr=True).print(f"note: {exc}; this scan cannot be resumed if interrupted (set --workdir)",
                                       markup=False, highlight=False)
        return None
    return root


def check_outputs(json_out: Optional[Path], html_out: Optional[Path], junit_out: Optional[Path]) -> None:
    """UserError now for report paths that clearly cannot be written (a file as folder, no permission)."""
    for path in (json_out, junit_out):
        if path is not None:
            check_writable(path)
    if html_out is not None:
        check_html_folder(html_out)
        check_writable(html_out, folder=True)


def write_outputs(result, train, json_out: Optional[Path], html_out: Optional[Path], junit_out: Optional[Path]) -> None:
    """Write the requested report files (each atomically)."""
    if json_out is not None:
        write_json(result.report, json_out)
    if html_out is not None:
        write_html(result.report, html_out, samples=result.samples, train=train)
    if junit_out is not None:
        write_junit(result.report, junit_out)
