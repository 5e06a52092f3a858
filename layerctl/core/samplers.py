"""Samplers and schedule types by their A1111 names, mapped onto diffusers schedulers.

The table is pure data (the CLI and the request schemas check names against it before anything
heavy is imported); `build_scheduler` makes a diffusers scheduler from a model's own scheduler
config (diffusers is imported only there).

Schedule types, as diffusers does them:

- karras / exponential / beta: `use_karras_sigmas` / `use_exponential_sigmas` / `use_beta_sigmas`
- sgm_uniform and simple: `timestep_spacing="trailing"` (both start at the last training step and
  step evenly; diffusers has one way to do that, so the two give the same pictures)
- normal: `timestep_spacing="linspace"` (k-diffusion's `get_sigmas`); for DDIM the model's
  "leading" spacing (A1111's DDIM discretisation: DDIM's own step assumes even steps)
- lcm runs LCMScheduler's own schedule (a skip over its 50-step training grid), written as SGM Uniform.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

SCHEDULES = {  # name -> A1111 "Schedule type" label
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "normal": "Normal",
    "simple": "Simple",
    "beta": "Beta",
}
SIGMA_FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}
SPACINGS = {"sgm_uniform": "trailing", "simple": "trailing", "normal": "linspace"}
ALL_SCHEDULES = tuple(SCHEDULES)
SPACING_ONLY = ("normal", "simple", "sgm_uniform")


@dataclass(frozen=True)
class SamplerInfo:
    label: str  # A1111 "Sampler" label
    cls: str  # diffusers scheduler class
    schedules: tuple  # schedule types it can run (the first is its default)
    kwargs: dict = field(default_factory=dict)  # fixed settings of the class
    noise: str = "none"  # "none", "generator" (fresh noise each step) or "brownian" (torchsde tree)
    zero_snr: bool = True  # the class can rescale betas to zero terminal SNR

    @property
    def default_schedule(self) -> str:
        return self.schedules[0]


SAMPLERS = {
    "dpmpp_2m": SamplerInfo("DPM++ 2M", "DPMSolverMultistepScheduler", ALL_SCHEDULES,
                            {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": SamplerInfo("DPM++ 2M SDE", "DPMSolverMultistepScheduler", ALL_SCHEDULES,
                                {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, noise="generator"),
    "dpmpp_sde": SamplerInfo("DPM++ SDE", "DPMSolverSDEScheduler", ALL_SCHEDULES, noise="brownian", zero_snr=False),
    "euler": SamplerInfo("Euler", "EulerDiscreteScheduler", ("normal",) + tuple(s for s in ALL_SCHEDULES if s != "normal")),
    "euler_a": SamplerInfo("Euler a", "EulerAncestralDiscreteScheduler", SPACING_ONLY, noise="generator"),
    "heun": SamplerInfo("Heun", "HeunDiscreteScheduler", ("normal",) + tuple(s for s in ALL_SCHEDULES if s != "normal"),
                        zero_snr=False),
    "ddim": SamplerInfo("DDIM", "DDIMScheduler", SPACING_ONLY, {"set_alpha_to_one": False, "clip_sample": False}),
    "unipc": SamplerInfo("UniPC", "UniPCMultistepScheduler", ("normal",) + tuple(s for s in ALL_SCHEDULES if s != "normal"),
                         {"solver_order": 2, "predict_x0": True, "solver_type": "bh2"}),
    "lcm": SamplerInfo("LCM", "LCMScheduler", ("sgm_uniform",), {"set_alpha_to_one": True, "clip_sample": False},
                       noise="generator"),
}
DEFAULT_SAMPLER = "dpmpp_2m"
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}
V_CFG_RESCALE = 0.7  # CFG rescale phi when the model predicts v (A1111 extension / diffusers default advice)


def check_sampler(name):
    """A sampler name (None passes); unknown names list the valid ones."""
    if name is not None and name not in SAMPLERS:
        raise ValueError(f"sampler '{name}' is unknown; valid: {', '.join(SAMPLERS)}")
    return name


def check_schedule(name):
    if name is not None and name not in SCHEDULES:
        raise ValueError(f"schedule '{name}' is unknown; valid: {', '.join(SCHEDULES)}")
    return name


def check_prediction(name):
    if name is not None and name not in ("auto", "epsilon", "v"):
        raise ValueError(f"prediction_type '{name}' is unknown; valid: auto, epsilon, v")
    return name


def check_pair(sampler, schedule, prediction=None, zero_snr=None) -> None:
    """Refuse combinations the scheduler cannot run (names already checked)."""
    info = SAMPLERS[sampler or DEFAULT_SAMPLER]
    name = sampler or DEFAULT_SAMPLER
    if schedule is not None and schedule not in info.schedules:
        raise ValueError(f"sampler {name} cannot use schedule {schedule}; valid for {name}: {', '.join(info.schedules)}")
    if prediction == "v" and zero_snr is not False and not info.zero_snr:
        raise ValueError(f"sampler {name} cannot do v-prediction with zero terminal SNR (its diffusers scheduler has no "
                         f"rescale_betas_zero_snr); pick another sampler or add --no-zero-snr")


@dataclass(frozen=True)
class Sampling:
    """What one job samples with, resolved against the model's scheduler config."""

    sampler: str = DEFAULT_SAMPLER
    schedule: str = "karras"
    prediction: str = "epsilon"  # diffusers prediction_type: epsilon, v_prediction (or the model's own)
    zero_snr: bool = False
    cfg_rescale: float = 0.0

    @property
    def info(self) -> SamplerInfo:
        return SAMPLERS[self.sampler]

    @property
    def labels(self) -> tuple[str, str]:
        """(A1111 Sampler label, A1111 Schedule type label)."""
        return self.info.label, SCHEDULES[self.schedule]

    def metadata(self) -> dict:
        return {"sampler": self.sampler, "sampler_label": self.labels[0], "schedule": self.schedule,
                "schedule_label": self.labels[1], "prediction_type": self.prediction, "zero_snr": self.zero_snr,
                "cfg_rescale": self.cfg_rescale}


def resolve(model_config, sampler=None, schedule=None, prediction=None, zero_snr=None, cfg_rescale=None) -> Sampling:
    """The job's choices over the defaults; `prediction` auto/None reads the model's scheduler config.

    Raises ValueError on a pair the scheduler cannot run (including an auto-detected v-prediction)."""
    name = sampler or DEFAULT_SAMPLER
    check_sampler(name)
    check_schedule(schedule)
    sched = schedule or SAMPLERS[name].default_schedule
    own = str(dict(model_config or {}).get("prediction_type") or "epsilon")
    pred = own if prediction in (None, "auto") else PREDICTIONS[prediction]
    is_v = pred == "v_prediction"
    zsnr = is_v if zero_snr is None else bool(zero_snr)
    check_pair(name, sched, "v" if is_v else None, zsnr if is_v else zero_snr)
    if zsnr and not SAMPLERS[name].zero_snr:
        raise ValueError(f"sampler {name} cannot do zero terminal SNR (its diffusers scheduler has no "
                         f"rescale_betas_zero_snr); pick another sampler")
    phi = (V_CFG_RESCALE if is_v else 0.0) if cfg_rescale is None else float(cfg_rescale)
    return Sampling(name, sched, pred, zsnr, phi)


def scheduler_kwargs(s: Sampling, model_config) -> dict:
    """The settings of the diffusers scheduler class for `s`, over the model's own config."""
    import inspect

    import diffusers

    cls = getattr(diffusers, s.info.cls)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kw = {k: v for k, v in dict(model_config or {}).items() if k in accepted}
    kw.update(s.info.kwargs)
    kw["prediction_type"] = s.prediction
    for sched, flag in SIGMA_FLAGS.items():
        if flag in accepted:
            kw[flag] = s.schedule == sched
    if s.schedule in SPACINGS and s.sampler != "lcm":
        kw["timestep_spacing"] = "leading" if (s.sampler == "ddim" and s.schedule == "normal") else SPACINGS[s.schedule]
        if kw["timestep_spacing"] == "leading":
            kw.setdefault("steps_offset", 1)
    if "rescale_betas_zero_snr" in accepted:
        kw["rescale_betas_zero_snr"] = s.zero_snr
    return {k: v for k, v in kw.items() if k in accepted}


def build_scheduler(s: Sampling, model_config):
    """A fresh diffusers scheduler for `s` built from the model's scheduler config (a copy of one built
    once: DPMSolverSDEScheduler's constructor alone takes 0.4 s on a CPU)."""
    import copy
    import json

    key = json.dumps({k: v for k, v in dict(model_config or {}).items() if not str(k).startswith("_")},
                     sort_keys=True, default=str)
    return copy.deepcopy(_prototype(s, key))


@functools.lru_cache(maxsize=32)
def _prototype(s: Sampling, config_json: str):
    import json

    import diffusers

    return getattr(diffusers, s.info.cls)(**scheduler_kwargs(s, json.loads(config_json)))
