"""The FLUX family's registration: its objective (plain rectified flow, or two-stage DFM with ``flux.dfm``) and
the settings it honours or refuses (REFERENCE.md sections 1, 4, 9).

FLUX is a velocity model on the rectified-flow (Linear) path in its own time convention: the path, prediction and
SiT loss weights are fixed (``flux.loss_weighting`` weighs its loss), sampling is deterministic (no SDE forms),
``sampler.time_shift`` defaults to ``auto`` (FLUX's resolution shift), ``flux.guidance`` is the guidance-embedding
value of distilled models and ``guidance.scale`` is true CFG against the empty prompt.
"""
from __future__ import annotations

from pipeline.config import TrainJobConfig
from pipeline.families import (
    FamilySpec,
    Objective,
    Refusal,
    conditional_transport_refusals,
    register_family,
    section_fields,
    unless,
)
from pipeline.transport.multiscale import dfm_refusals
from pipeline.transport.objective import guidance_refusals, sampler_refusals


def build_flux_objective(cfg: TrainJobConfig, num_classes: int) -> Objective:
    """:class:`~pipeline.flux.objective.FluxObjective`, or with ``flux.dfm=true``
    :class:`~pipeline.flux.dfm.FluxDFMObjective`."""
    if cfg.flux.dfm:
        from pipeline.flux.dfm import FluxDFMObjective

        return FluxDFMObjective.from_config(cfg)
    from pipeline.flux.objective import FluxObjective

    return FluxObjective.from_config(cfg)


def flux_refusals(cfg: TrainJobConfig) -> list[Refusal]:
    tr, s, d = cfg.transport, cfg.sampler, TrainJobConfig()
    out = conditional_transport_refusals(cfg)
    for key in ("logit_mean", "logit_std"):
        if getattr(tr, key) != getattr(d.transport, key):
            ok = tr.time_sampler == "logit_normal" or (cfg.flux.dfm and tr.time_sampler == "auto")
            out += unless(ok, f"transport.{key}", getattr(tr, key),
                          f"it applies to transport.time_sampler=logit_normal only (time_sampler is {tr.time_sampler})")
    if not cfg.flux.dfm:
        for key in ("dfm_stage_probs", "dfm_threshold", "dfm_stage_steps"):
            if getattr(cfg.model, key) != getattr(d.model, key):
                out.append(Refusal(f"model.{key}", getattr(cfg.model, key), "it applies with flux.dfm=true only"))
        out += unless(s.method == "ode", "sampler.method", s.method,
                      "FLUX sampling is the deterministic ODE (no SDE form is implemented for FLUX)")
        return out + sampler_refusals(cfg) + guidance_refusals(cfg)
    out += unless(cfg.model.dfm_stages == d.model.dfm_stages, "model.dfm_stages", cfg.model.dfm_stages,
                  "FLUX DFM has exactly 2 stages (FLUX packs 2x2)")
    out += unless(cfg.flux.loss_weighting == "none", "flux.loss_weighting", cfg.flux.loss_weighting,
                  "it does not apply with flux.dfm=true (DFM weighs its stages by model.dfm_stage_probs)")
    out += unless(cfg.guidance.scale == 1.0, "guidance.scale", cfg.guidance.scale,
                  "FLUX DFM sampling has no classifier-free guidance (flux.guidance sets the embedding)")
    out += unless(not tr.resolution_shift, "transport.resolution_shift", tr.resolution_shift,
                  "FLUX DFM draws its stage times itself")
    return out + sampler_refusals(cfg) + [r for r in dfm_refusals(cfg) if not r.key.startswith("guidance.")]


NOT_FLUX = {
    "transport.path": "FLUX is trained on the rectified-flow (linear) path",
    "transport.prediction": "FLUX predicts velocity",
    "transport.loss_weight": "use flux.loss_weighting (none, sigma_sqrt, cosmap)",
    "transport.sample_eps": "FLUX samples the whole [0, 1]",
    "model.learn_sigma": "the FLUX transformer is built from flux.weights",
    "model.class_dropout_prob": "FLUX conditions on text, not class labels",
    "model.grad_checkpointing": "use flux.grad_checkpointing",
    **{k: "the FLUX architecture comes from flux.weights / flux.config"
       for k in ("model.hidden_size", "model.depth", "model.num_heads", "model.patch_size", "model.mlp_ratio")},
    **{f"sampler.{k}": "FLUX sampling is the deterministic ODE"
       for k in ("diffusion", "diffusion_norm", "last_step", "last_step_size")},
    "sampler.preset": "the presets reproduce SiT's samplers",
    "guidance.channels": "FLUX guidance acts on the whole velocity",
}

FLUX_HONOURS = (frozenset(f"transport.{k}" for k in ("time_sampler", "logit_mean", "logit_std", "mode_scale",
                                                     "resolution_shift", "train_eps"))
                | frozenset(f"sampler.{k}" for k in ("method", "solver", "steps", "atol", "rtol", "time_shift"))
                | (frozenset(section_fields("guidance")) - {"guidance.channels"}) | frozenset(section_fields("flux"))
                | frozenset(f"model.{k}" for k in ("dfm_stages", "dfm_stage_probs", "dfm_threshold", "dfm_stage_steps")))

register_family(FamilySpec(name="flux", matches=lambda name: name.lower() == "flux", build=build_flux_objective,
                           honours=FLUX_HONOURS, refuse=flux_refusals, notes=NOT_FLUX))
