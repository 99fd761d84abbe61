"""`memaudit inspect MODEL`: print what was detected (format, parameterisation, schedule, sigma range, conditioning,
image shape) and check one forward pass, so a user sees what a scan will assume before spending GPU time."""

from __future__ import annotations

import json
from typing import Optional

import typer

from memaudit.cli import options as opt
from memaudit.errors import UserError


def inspect(
    model: str = typer.Argument(..., metavar="MODEL", help="Checkpoint (folder or file), as `scan` takes it."),
    json_out: bool = typer.Option(False, "--json", help="Print the settings as one JSON object."),
    param: Optional[opt.ParamName] = opt.PARAM,
    schedule: Optional[opt.ScheduleName] = opt.SCHEDULE,
    factory: Optional[str] = opt.FACTORY,
    factory_args: Optional[str] = opt.FACTORY_ARGS,
    model_config: Optional[str] = opt.MODEL_CONFIG,
    num_classes: Optional[int] = opt.NUM_CLASSES,
    trust_pickle: bool = opt.TRUST_PICKLE,
    sigma_min: Optional[float] = opt.SIGMA_MIN,
    sigma_max: Optional[float] = opt.SIGMA_MAX,
    round_timesteps: bool = opt.ROUND_TIMESTEPS,
    vae: Optional[str] = opt.VAE,
    latent_scale: Optional[float] = opt.LATENT_SCALE,
    device: str = opt.DEVICE,
) -> None:
    """Show how MODEL will be read: its format, parameterisation, schedule, sigma range, limits and image shape."""
    from memaudit.models import latent
    from memaudit.models.describe import describe_model
    from memaudit.models.load import check_model_on_data, is_empirical_spec, load_model

    if is_empirical_spec(model):
        raise UserError("the empirical model is built from the training data: nothing to inspect without DATA")
    opt.positive(sigma_min, "--sigma-min")
    opt.positive(sigma_max, "--sigma-max")
    denoiser = load_model(model, device=opt.resolve_device(device), param=param, schedule=schedule, factory=factory,
                          trust_pickle=trust_pickle, sigma_min=sigma_min, sigma_max=sigma_max,
                          round_timesteps=round_timesteps, model_config=model_config, factory_args=factory_args,
                          vae=vae, latent_scale=latent_scale, num_classes=num_classes)
    info = describe_model(denoiser)
    if latent.is_latent(denoiser) and info["latent"]["decoded_shape"] is not None:
        latent.check_on_data(denoiser, tuple(info["latent"]["decoded_shape"]))  # encoder, UNet and decoder agree
    elif denoiser.image_shape is not None:
        check_model_on_data(denoiser, tuple(denoiser.image_shape))  # a wrong guess fails here, not mid-scan
    info["forward_check"] = "passed" if denoiser.image_shape is not None else "skipped (no recorded image shape)"
    print(json.dumps(info, indent=2) if json_out else "\n".join(lines(info)))


def lines(info: dict) -> list[str]:
    """The settings as aligned 'name: value' lines."""
    sched = info["schedule"] or {}
    steps = f", {sched['timesteps']} discrete timesteps ({sched['interpolation']} sigma between them)" \
        if "timesteps" in sched else ""
    shape = "x".join(map(str, info["image_shape"])) if info["image_shape"] else "any (taken from the data)"
    rows = [("format", info["format"]), ("path", info["path"]),
            ("parameterisation", f"{info['parameterisation']} ({info['parameterisation_summary']})"
             if info["parameterisation_summary"] else info["parameterisation"]),
            ("schedule", f"{sched.get('kind')} ({sched.get('summary')}){steps}, sigma_data {sched.get('sigma_data'):g}"
             if sched else None),
            ("sigma range", f"[{info['sigma_min']:.6g}, {info['sigma_max']:.6g}]"),
            ("x0 limit", info["x0_limit"] or "none"), ("noise input", info["noise_input"]),
            ("conditioning", info["conditioning"]), ("image shape", shape),
            *latent_rows(info.get("latent")),
            ("parameters", f"{info['parameters']:,}"), ("forward check", info["forward_check"])]
    return [f"{name + ':':18}{opt.printable(value)}" for name, value in rows if value is not None]


def latent_rows(latent: Optional[dict]) -> list[tuple[str, str]]:
    """A latent model's rows: its autoencoder, scaling factor, latent and decoded shapes."""
    if not latent:
        return []
    shape = lambda s: "x".join(map(str, s)) if s else "unknown"  # noqa: E731
    shift = f", shift {latent['shift_factor']:g}" if latent["shift_factor"] else ""
    return [("latent", f"{latent['vae']} {latent['vae_path']} ({latent['vae_parameters']:,} parameters)"),
            ("scaling factor", f"{latent['scaling_factor']:g} (from {latent['scaling_factor_from']}){shift}"),
            ("latent shape", shape(latent["latent_shape"])), ("decoded shape", shape(latent["decoded_shape"]))]
