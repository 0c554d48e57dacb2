"""Flow-map settings that depend on each other or on the model: each refused in one line (REFERENCE.md section 11).

- ``decoupled_blocks``: k = round(depth * 8 / 28) by default (the authors' XL/2 puts 8 of its 28 blocks on the target
  time), at least 1; an explicit k must lie in [1, depth].
- ``fd_eps``: the central difference runs in fp32 with autocast off (:mod:`.identity`); its rounding error grows as
  ~1e-6 / eps (an fp32 forward pass carries ~1e-6 relative error), measured on SiT hidden 64 depth 3: relative error of
  d/ds u 0.59 at eps 1e-6, 0.075 at 1e-5, 7e-3 at 1e-4, 8e-4 at 1e-3. Below :data:`FD_EPS_MIN` fp32 does not
  resolve the step.
- recipe-specific time laws: ``ratio``/``time_sampler``/``logit_mean`` belong to ``recipe=split``,
  ``fm_logit_mean``/``mf_logit_means`` to ``recipe=dmf``; setting the other recipe's is refused.
- model guidance (``guidance`` = omega > 0): needs label dropout (the unconditional velocity is learned from dropped
  labels), ``guidance_t_min <= guidance_t_max``; a map trained with it refuses sampling-time CFG (``guidance.scale``
  != 1), since the guided map is already learned.
"""
from __future__ import annotations

from typing import Any

# pipeline.config imports this module, so the config types are not imported here (not even for type checking:
# tests/test_import_graph.py counts every import); ``fm`` is a FlowMapConfig and ``cfg`` a TrainJobConfig.
FlowMapConfig = TrainJobConfig = Any

FD_EPS_MIN = 1e-4
SPLIT_ONLY = ("ratio", "time_sampler", "logit_mean")
DMF_ONLY = ("fm_logit_mean", "mf_logit_means")
GUIDANCE_INTERVAL = ("guidance_t_min", "guidance_t_max")
# every field a flow-map config had before recipes existed: a stored config with all of them and no `recipe` was
# trained with the (then only) split recipe
LANDED_FIELDS = frozenset({"decoupled_blocks", "jvp", "fd_eps", "target", "teacher", "teacher_guidance", "ratio",
                           "time_sampler", "logit_mean", "logit_std", "weight_power", "weight_eps"})


def default_decoupled_blocks(depth: int) -> int:
    """k = round(depth * 8 / 28), at least 1."""
    return max(1, round(depth * 8 / 28))


def decoupled_blocks(fm: FlowMapConfig, depth: int) -> int:
    return fm.decoupled_blocks if fm.decoupled_blocks is not None else default_decoupled_blocks(depth)


def model_depth(cfg: TrainJobConfig) -> int:
    from pipeline.models.sit import parse_named_config  # lazy: only torch/numpy below it

    named = parse_named_config(cfg.model.name) if cfg.model.name.strip().lower() != "sit" else None
    return named[0].depth if named else cfg.model.depth


def landed_recipe(data: Any) -> Any:
    """A stored pre-recipe flow-map config (every landed field, no ``recipe``) gets ``recipe=split``."""
    if isinstance(data, dict) and "recipe" not in data and LANDED_FIELDS <= set(data):
        return {**data, "recipe": "split"}
    return data


def _changed(fm: FlowMapConfig, names: tuple[str, ...]) -> str | None:
    fields = type(fm).model_fields
    return next((n for n in names if getattr(fm, n) != fields[n].default), None)


def recipe_refusal(cfg: TrainJobConfig, depth: int) -> str | None:
    """Why the flow-map settings of ``cfg`` (a SiT of ``depth`` blocks) do not fit together, in one line; or None."""
    fm = cfg.flow_map
    k = decoupled_blocks(fm, depth)
    if not 1 <= k <= depth:
        return f"flow_map.decoupled_blocks={k} is outside [1, {depth}] (the model depth is {depth} blocks)"
    if fm.jvp == "finite_difference" and fm.fd_eps < FD_EPS_MIN:
        return (f"flow_map.fd_eps={fm.fd_eps:g} is below what the fp32 central difference resolves "
                f"(>= {FD_EPS_MIN:g}; the rounding error grows as ~1e-6 / eps)")
    if fm.jvp == "func" and _changed(fm, ("fd_eps",)):
        return "flow_map.fd_eps is set but flow_map.jvp=func (the step is used by jvp=finite_difference only)"
    other = _changed(fm, SPLIT_ONLY if fm.recipe == "dmf" else DMF_ONLY)
    if other:
        owner = "split" if fm.recipe == "dmf" else "dmf"
        return f"flow_map.{other} is a flow_map.recipe={owner} setting, but flow_map.recipe={fm.recipe}"
    if fm.guidance == 0:
        unused = _changed(fm, GUIDANCE_INTERVAL)
        if unused:
            return f"flow_map.{unused} is set but flow_map.guidance=0 (model guidance is off)"
        return None
    if fm.guidance_t_min > fm.guidance_t_max:
        return (f"flow_map.guidance_t_min={fm.guidance_t_min:g} is above flow_map.guidance_t_max="
                f"{fm.guidance_t_max:g}")
    if cfg.model.class_dropout_prob <= 0:
        return ("flow_map.guidance needs model.class_dropout_prob > 0 (the unconditional velocity is learned from "
                "dropped labels)")
    if cfg.guidance.scale != 1.0:
        return (f"guidance.scale={cfg.guidance.scale:g} on a flow map trained with model guidance "
                f"(flow_map.guidance={fm.guidance:g}): the guided map is already learned; sample with guidance.scale=1")
    return None
