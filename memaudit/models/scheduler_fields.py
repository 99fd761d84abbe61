"""diffusers scheduler config fields: each one honoured in D(x, sigma) or refused, one table.

The scheduler is built by diffusers itself (`cls.from_config`, so missing fields take the class's defaults) and
its own alphas_cumprod gives the VP schedule, sigma_t = sqrt((1 - abar_t) / abar_t). Roles:
  schedule  beta_schedule, beta_start, beta_end, num_train_timesteps, trained_betas: abar_t, as diffusers computes it
  output    prediction_type epsilon | sample | v_prediction: D = x - sigma eps | x0 | abar x - sigma sqrt(abar) v
  x0        clip_sample(_range), thresholding (+ ratio, max value): D limited as the scheduler's step does
  timestep  interpolation_type (+ use_*_sigmas): fractional timesteps interpolate sigma linearly (Euler's
            "linear") or log sigma (its karras/exponential/beta sigmas, and k-diffusion)
  sampling  which timesteps / solver the library's sampler visits (timestep_spacing, steps_offset, solver_order,
            ...): D at a given sigma does not depend on them; memaudit samples with its own sigma schedule
Fields that would change D in a way memaudit does not model are refused unless they hold their neutral value;
fields this table does not know are refused too (D might depend on them).
"""

from __future__ import annotations

from typing import Any, Optional

from memaudit.errors import UserError
from memaudit.models.x0_limits import X0Limit

SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
OUTPUT_FIELDS = ("prediction_type",)
X0_FIELDS = ("clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value")
TIMESTEP_FIELDS = ("interpolation_type", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
SAMPLING_FIELDS = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "variance_type", "solver_order",
                   "solver_type", "algorithm_type", "lower_order_final", "euler_at_final", "final_sigmas_type",
                   "lambda_min_clipped", "skip_prk_steps", "predict_x0", "disable_corrector", "solver_p",
                   "sigma_min", "sigma_max", "time_shift_type", "flow_shift", "use_lu_lambdas", "noise_sampler_seed",
                   "rho")
# field -> the only value that leaves D as the table above computes it, and why another value is refused.
NEUTRAL = {
    "rescale_betas_zero_snr": (False, "zero terminal SNR (sigma_T = inf) has no finite sigma range"),
    "timestep_type": ("discrete", "continuous timesteps feed the UNet 0.25 ln(sigma), not t"),
    "use_flow_sigmas": (False, "flow-matching sigmas are not a VP schedule"),
    "use_dynamic_shifting": (False, "resolution-dependent timestep shifting is not a VP schedule"),
    "shift_terminal": (None, "a shifted terminal timestep is not a VP schedule"),
}
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
VP_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                 "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                 "LMSDiscreteScheduler", "HeunDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler",
                 "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler", "DDPMParallelScheduler",
                 "DDIMParallelScheduler", "DPMSolverSDEScheduler")
LINEAR_INTERPOLATING = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler",
                        "HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler")
KNOWN = set(SCHEDULE_FIELDS + OUTPUT_FIELDS + X0_FIELDS + TIMESTEP_FIELDS + SAMPLING_FIELDS) | set(NEUTRAL)
OVERRIDE = "pass --param and --schedule to use the UNet without its scheduler config"


def build_scheduler(config: dict, source: Any) -> Any:
    """diffusers' own scheduler object of the config's _class_name, refusing classes that are not VP."""
    import diffusers

    name = config.get("_class_name", "DDPMScheduler")
    if name not in VP_SCHEDULERS or not hasattr(diffusers, name):
        raise UserError(f"{source}: the scheduler {name} is not a discrete VP (beta) scheduler memaudit maps to "
                        f"D(x, sigma); {OVERRIDE}")
    try:
        return getattr(diffusers, name).from_config(config)
    except Exception as exc:  # diffusers refuses e.g. an unknown beta_schedule with NotImplementedError
        raise UserError(f"{source}: diffusers cannot build its {name}: {type(exc).__name__}: {exc}") from None


def check_fields(config: dict, source: Any) -> None:
    """UserError naming the first field that would change D in a way memaudit does not model, or is unknown."""
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key in NEUTRAL and value != NEUTRAL[key][0]:
            raise UserError(f"{source}: scheduler field {key}={value!r} is not supported ({NEUTRAL[key][1]}); "
                            f"{OVERRIDE}")
        if key not in KNOWN:
            raise UserError(f"{source}: unknown scheduler field {key}={value!r}: memaudit cannot tell whether it "
                            f"changes D(x, sigma); {OVERRIDE}")
    if config.get("interpolation_type", "linear") not in ("linear",):
        raise UserError(f"{source}: interpolation_type {config['interpolation_type']!r} spaces sigmas apart from "
                        f"its timesteps, so D is not a function of sigma; {OVERRIDE}")


def param_of(config: dict, source: Any) -> str:
    """prediction_type epsilon|v_prediction|sample -> eps|v|x0."""
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise UserError(f"{source}: unknown prediction_type {kind!r}; pass --param")
    return PREDICTION_TYPES[kind]


def x0_limit_of(config: dict) -> Optional[X0Limit]:
    """thresholding (it takes precedence, as in the schedulers' step) or clip_sample, else None."""
    if config.get("thresholding"):
        return X0Limit("threshold", float(config.get("sample_max_value", 1.0)),
                       float(config.get("dynamic_thresholding_ratio", 0.995)))
    if config.get("clip_sample"):
        return X0Limit("clip", float(config.get("clip_sample_range", 1.0)))
    return None


def interpolation_of(config: dict) -> str:
    """How fractional timesteps map to sigma: "linear" for the k-style schedulers that interpolate sigma linearly
    between timesteps (unless karras/exponential/beta sigmas, whose t they find by log sigma), "log" otherwise
    (k-diffusion's convention; DDPM/DDIM-style schedulers visit integer timesteps only, where both agree)."""
    if config.get("_class_name") not in LINEAR_INTERPOLATING or any(config.get(k) for k in TIMESTEP_FIELDS[1:]):
        return "log"
    return "linear"
