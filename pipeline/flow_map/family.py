"""The flow-map family: a SiT trained with ``objective.name=flow_map`` (REFERENCE.md section 11).

Its own :class:`~pipeline.families.FamilySpec`, so that only what a flow map uses is accepted:

- ``model.*``: SiT's (sizes for ``model.name=sit``; a named ``SiT-*`` size fixes them); ``flow_map.*``: all of
  them (their combinations: :func:`pipeline.config.flow_map_refusal`).
- ``transport.*``: none for training (the loss draws its own times from ``flow_map.*`` on the linear path with
  velocity prediction); ``transport.sample_eps`` only when sampling as a flow (``sampler.method`` ode/sde).
- ``sampler.*``: ``method``, ``steps``, ``time_shift``; with ``method=flow_map`` the jumps need no solver, so
  ``solver``, ``atol``/``rtol``, the SDE fields and a ``preset`` (an ODE/SDE recipe) are refused; with ``ode``/``sde``
  the velocity ``u(x, t, t)`` is integrated by SiT's samplers and SiT's rules apply.
- ``guidance.*``: ``scale``, ``t_min``/``t_max`` (CFG on the average velocity); ``channels`` only with ode/sde.
"""
from __future__ import annotations

from pipeline.config import TrainJobConfig
from pipeline.families import FamilySpec, Refusal, register_family, section_fields
from pipeline.models.sit import parse_named_config
from pipeline.transport.objective import SIT_MODEL, SIZE_FIELDS, guidance_refusals, sampler_refusals

SOLVER_FIELDS = ("preset", "solver", "atol", "rtol", "diffusion", "diffusion_norm", "last_step", "last_step_size")
HONOURS = (SIT_MODEL | SIZE_FIELDS | {"transport.sample_eps"} | frozenset(section_fields("sampler"))
           | frozenset(section_fields("guidance")) | frozenset(section_fields("flow_map")))
NOTES = {**{k: "a flow map trains on its own times (flow_map.recipe, flow_map.time_sampler, flow_map.*logit*) on "
               "transport.path=linear with transport.prediction=velocity" for k in section_fields("transport")},
         **{k: "flux.* settings apply to model.name=flux" for k in section_fields("flux")}}


def flow_map_refusals(cfg: TrainJobConfig) -> list[Refusal]:
    """Settings a flow map accepts only in some combinations (see the module docstring)."""
    default = TrainJobConfig()
    out: list[Refusal] = []
    if cfg.model.name.strip().lower() != "sit" and parse_named_config(cfg.model.name) is not None:
        out += [Refusal(k, _get(cfg, k), "a named size fixes the architecture (use model.name=sit for a custom size)")
                for k in sorted(SIZE_FIELDS) if _get(cfg, k) != _get(default, k)]
    if cfg.sampler.method != "flow_map":
        return out + sampler_refusals(cfg) + guidance_refusals(cfg)
    why = "sampler.method=flow_map jumps with the flow map in sampler.steps steps (no ODE/SDE solver)"
    out += [Refusal(f"sampler.{k}", getattr(cfg.sampler, k), why) for k in SOLVER_FIELDS
            if getattr(cfg.sampler, k) != getattr(default.sampler, k)]
    if cfg.transport.sample_eps != default.transport.sample_eps:
        out.append(Refusal("transport.sample_eps", cfg.transport.sample_eps, "the flow-map jumps run on [0, 1]; it "
                                                                             "applies to sampler.method=ode/sde"))
    if cfg.guidance.channels != default.guidance.channels:
        out.append(Refusal("guidance.channels", cfg.guidance.channels, "flow-map guidance acts on every channel; "
                                                                        "it applies to sampler.method=ode/sde"))
    if cfg.guidance.scale == 1.0:
        out += [Refusal(f"guidance.{k}", getattr(cfg.guidance, k), "a guidance interval needs guidance.scale != 1")
                for k in ("t_min", "t_max") if getattr(cfg.guidance, k) != getattr(default.guidance, k)]
    return out


def _get(cfg: TrainJobConfig, key: str):  # noqa: ANN202
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _build(cfg: TrainJobConfig, num_classes: int):  # noqa: ANN202
    from pipeline.flow_map.objective import FlowMapObjective

    return FlowMapObjective.from_config(cfg, num_classes)


def _is_sit(name: str) -> bool:
    return name.lower() == "sit" or parse_named_config(name) is not None


FLOW_MAP = register_family(FamilySpec(name="flow_map", matches=_is_sit, build=_build, honours=HONOURS,
                                      refuse=flow_map_refusals, notes=NOTES, objective="flow_map"))
