"""Decomposable Flow Matching (DFM, REFERENCE.md section 6): Laplacian pyramid, stage-wise training and sampling.

Pyramid (S stages, coarse first): ``g_{S-1} = x``, ``g_{s-1} = down(g_s)``; stage 0 is ``g_0`` and stage ``s`` is
``g_s - up(g_{s-1})``. Reconstruction ``r_0 = stage_0``, ``r_s = up(r_{s-1}) + stage_s`` returns ``x`` exactly (up to
float rounding), whatever the resampling; here down/up are bilinear x1/2 and x2.

Training (t = 0 noise, t = 1 data, each stage its own flow ``x_t,s = alpha(t_s) x1_s + sigma(t_s) x0_s``):
pick a stage ``q ~ p_q``; ``t_q ~ logit-normal(m, s)``; earlier stages ``t ~ logit-normal(1.5, 1)`` (nearly clean);
later stages are pure noise: their inputs are zeroed, their time is 0 and their loss is masked. The loss is the mean
over active stages (``s <= q``) of the per-stage mean squared velocity error.

Training times of the chosen stage follow ``transport.time_sampler`` (``auto``: the paper's logit-normal
``(logit_mean, logit_std)``); active stages' times are mapped into ``[train_eps, 1 - train_eps]`` (VP / LinearVP
get SiT's default eps, REFERENCE.md section 2).

Sampling: phase ``k`` starts stage ``k`` from noise and runs ``steps[k]`` steps taking it from 0 to ``tau``
(to 1 in the last phase) while every earlier stage ``j`` moves on to ``1 - (1 - tau)^(k - j + 1)`` (to 1 in the last
phase); stages not yet started are zero with time 0, as in training. Two stages with steps [30, 10]: stage 0 goes
0 -> tau alone in 30 steps, then both finish in 10 (stage 0 tau -> 1, stage 1 0 -> 1). Each phase's fraction
``u = i / steps`` may be shifted (``sampler.time_shift``: ``u / (u + shift (1 - u))``); the step is Euler (NFE =
sum(steps)), Heun or midpoint (2 NFE per step). Stage times ``u`` in [0, 1] map to ``[sample_eps, 1 - sample_eps]``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import GuidanceConfig, TrainJobConfig, TransportConfig
from pipeline.families import FamilySpec, Refusal, SampleOutput, register_family, section_fields, unless
from pipeline.transport.core import default_eps
from pipeline.transport.paths import LinearPath, Path, build_path
from pipeline.transport.timesteps import sample_train_times, shift_time

STAGE_SOLVERS = ("euler", "heun", "midpoint")


def downsample(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x1/2 (H and W must be even)."""
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Bilinear x2."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def check_divisible(size: int, stages: int) -> None:
    if size % 2 ** (stages - 1):
        raise ValueError(f"image size {size} cannot be halved {stages - 1} times for model.dfm_stages={stages}")


def decompose(x: torch.Tensor, stages: int) -> list[torch.Tensor]:
    """Laplacian pyramid of ``x`` (B, C, H, W): ``stages`` tensors, coarsest (H / 2^(S-1)) first."""
    check_divisible(x.shape[-1], stages)
    check_divisible(x.shape[-2], stages)
    gauss = [x]
    for _ in range(stages - 1):
        gauss.insert(0, downsample(gauss[0]))
    return [gauss[0]] + [gauss[s] - upsample(gauss[s - 1]) for s in range(1, stages)]


def reconstruct(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`decompose`: upsample and add, coarse to fine."""
    out = parts[0]
    for part in parts[1:]:
        out = upsample(out) + part
    return out


def default_stage_probs(stages: int) -> list[float]:
    """p_q: [0.9, 0.1] for two stages (the paper's default), uniform otherwise."""
    return [0.9, 0.1] if stages == 2 else [1.0 / stages] * stages


def default_stage_steps(total: int, stages: int) -> list[int]:
    """Split ``total`` Euler steps: 3/4 to the first phase (30/10 of 40), the rest evenly over later phases."""
    if stages == 1:
        return [total]
    first = max(1, round(total * 0.75))
    rest = max(stages - 1, total - first)
    later = [rest // (stages - 1) + (1 if i < rest % (stages - 1) else 0) for i in range(stages - 1)]
    return [first] + later


def phase_end_times(stages: int, tau: float) -> list[list[float]]:
    """``ends[k][j]``: the time stage ``j <= k`` reaches at the end of phase ``k``."""
    ends = []
    for k in range(stages):
        if k == stages - 1:
            ends.append([1.0] * stages)
        else:
            ends.append([1.0 - (1.0 - tau) ** (k - j + 1) if j <= k else 0.0 for j in range(stages)])
    return ends


@dataclass
class DFMObjective:
    """The DFM training loss and stage-wise Euler sampler behind the :class:`pipeline.objective.Objective` seam."""

    stages: int = 2
    stage_probs: list[float] = field(default_factory=lambda: default_stage_probs(2))
    stage_steps: list[int] = field(default_factory=lambda: [30, 10])
    threshold: float = 0.9
    path: Path = field(default_factory=LinearPath)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    clean_mean: float = 1.5  # earlier stages: logit-normal(1.5, 1), nearly clean
    clean_std: float = 1.0
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    num_classes: int | None = None
    time_cfg: TransportConfig | None = None  # None or time_sampler=auto: logit-normal(logit_mean, logit_std)
    train_eps: float = 0.0
    sample_eps: float = 0.0
    solver: str = "euler"
    time_shift: float = 1.0

    def __post_init__(self) -> None:
        if self.solver not in STAGE_SOLVERS:
            raise ValueError(f"sampler.solver={self.solver} is not a DFM stage solver (allowed: {', '.join(STAGE_SOLVERS)})")
        if len(self.stage_probs) != self.stages:
            raise ValueError(f"model.dfm_stage_probs has {len(self.stage_probs)} entries for "
                             f"model.dfm_stages={self.stages}")
        if any(p < 0 for p in self.stage_probs) or not math.isclose(sum(self.stage_probs), 1.0, abs_tol=1e-6):
            raise ValueError(f"model.dfm_stage_probs={self.stage_probs} must be non-negative and sum to 1")
        if len(self.stage_steps) != self.stages or any(n < 1 for n in self.stage_steps):
            raise ValueError(f"model.dfm_stage_steps={self.stage_steps} must hold {self.stages} positive step counts")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"model.dfm_threshold={self.threshold} must be in (0, 1]")

    @classmethod
    def from_config(cls, cfg: TrainJobConfig, num_classes: int) -> "DFMObjective":
        m, tr = cfg.model, cfg.transport
        if tr.prediction != "velocity":
            raise ValueError(f"transport.prediction={tr.prediction}: DFM trains velocity prediction only")
        probs = m.dfm_stage_probs or default_stage_probs(m.dfm_stages)
        steps = m.dfm_stage_steps or default_stage_steps(cfg.sampler.steps, m.dfm_stages)
        path = build_path(tr)
        d_train, d_sample = default_eps(path, "velocity")
        return cls(stages=m.dfm_stages, stage_probs=list(probs), stage_steps=list(steps), threshold=m.dfm_threshold,
                   path=path, logit_mean=tr.logit_mean, logit_std=tr.logit_std,
                   guidance=cfg.guidance, num_classes=num_classes, time_cfg=tr,
                   train_eps=d_train if tr.train_eps is None else tr.train_eps,
                   sample_eps=d_sample if tr.sample_eps is None else tr.sample_eps,
                   solver=cfg.sampler.solver,
                   time_shift=1.0 if cfg.sampler.time_shift is None else float(cfg.sampler.time_shift))

    # ------------------------------------------------------------ training

    def sample_times(self, n: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample stage ``q`` (n,) and times (n, S): earlier nearly clean, q logit-normal, later 0."""
        g_dev = generator.device if generator is not None else device
        probs = torch.tensor(self.stage_probs, dtype=torch.float, device=g_dev)
        q = torch.multinomial(probs.expand(n, -1), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.stages, generator=generator, device=g_dev)
        idx = torch.arange(self.stages, device=g_dev)[None]
        if self.time_cfg is None or self.time_cfg.time_sampler == "auto":
            t_q = torch.sigmoid(self.logit_mean + self.logit_std * z)
        else:  # the configured sampler for the chosen stage (eps applied below)
            t_q = sample_train_times(self.time_cfg, n, 0.0, generator=generator, device=g_dev)[:, None].expand(-1, self.stages)
        t_clean = torch.sigmoid(self.clean_mean + self.clean_std * z)
        t = torch.where(idx < q[:, None], t_clean, torch.where(idx == q[:, None], t_q, torch.zeros_like(z)))
        eps = self.train_eps
        t = torch.where(idx <= q[:, None], eps + (1 - 2 * eps) * t, t)
        return q.to(device), t.to(device)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x1 = batch["image"]
        n = x1.shape[0]
        parts = decompose(x1, self.stages)
        q, t = self.sample_times(n, x1.device)
        t = t.to(x1.dtype)
        active = torch.arange(self.stages, device=x1.device)[None] <= q[:, None]  # (n, S)
        inputs, targets = [], []
        for s, x1_s in enumerate(parts):
            x0_s = torch.randn_like(x1_s)
            ts = t[:, s].reshape(-1, 1, 1, 1)
            keep = active[:, s].reshape(-1, 1, 1, 1).to(x1.dtype)
            inputs.append(keep * (self.path.alpha(ts) * x1_s + self.path.sigma(ts) * x0_s))
            targets.append(self.path.d_alpha(ts) * x1_s + self.path.d_sigma(ts) * x0_s)
        preds = model(inputs, t, batch["label"]) if "label" in batch else model(inputs, t)
        per_stage = torch.stack([(p.float() - u.float()).square().flatten(1).mean(1)
                                 for p, u in zip(preds, targets)], dim=1)  # (n, S)
        mask = active.float()
        return ((per_stage * mask).sum(1) / mask.sum(1)).mean()

    # ------------------------------------------------------------ sampling

    def _velocity(self, model: nn.Module, xs: list[torch.Tensor], t: torch.Tensor, y: torch.Tensor | None,
                  t_guide: float) -> list[torch.Tensor]:
        g = self.guidance
        if y is None:
            return model(xs, t)
        if g.scale == 1.0 or not (g.t_min <= t_guide <= g.t_max):
            return model(xs, t, y)
        if self.num_classes is None:
            raise ValueError("guidance.scale != 1 needs a class-conditional model (num_classes)")
        null = torch.full_like(y, self.num_classes)
        outs = model([torch.cat([x, x]) for x in xs], torch.cat([t, t]), torch.cat([y, null]))
        mixed = []
        for out in outs:
            cond, uncond = out.chunk(2)
            mixed.append(uncond + g.scale * (cond - uncond))
        return mixed

    @torch.no_grad()
    def sample(self, model: nn.Module, cond: dict[str, torch.Tensor], shape: tuple[int, ...],
               generator: torch.Generator | None = None) -> SampleOutput:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        b, c, h, w = shape
        check_divisible(h, self.stages)
        check_divisible(w, self.stages)
        g_dev = generator.device if generator is not None else device
        sizes = [(h // 2 ** (self.stages - 1 - s), w // 2 ** (self.stages - 1 - s)) for s in range(self.stages)]
        xs = [torch.zeros(b, c, *hw, device=device, dtype=dtype) for hw in sizes]
        times = [0.0] * self.stages
        y = cond["label"].to(device) if "label" in cond else None
        nfe = 0
        lo, hi = self.sample_eps, 1.0 - self.sample_eps  # stage time u in [0, 1] -> lo + (hi - lo) u

        def velocity(states: list[torch.Tensor], u: list[float], k: int) -> list[torch.Tensor]:
            nonlocal nfe
            nfe += 1
            t = torch.tensor([lo + (hi - lo) * v if j <= k else 0.0 for j, v in enumerate(u)],
                             device=device, dtype=dtype)[None].expand(b, -1)
            return [(hi - lo) * v.to(dtype) for v in self._velocity(model, states, t, y, float(t[0, k]))]

        for k, (steps, ends) in enumerate(zip(self.stage_steps, phase_end_times(self.stages, self.threshold))):
            xs[k] = torch.randn(b, c, *sizes[k], generator=generator, device=g_dev).to(device=device, dtype=dtype)
            starts = list(times)
            frac = shift_time(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), self.time_shift).tolist()

            def at(f: float) -> list[float]:
                return [starts[j] + (ends[j] - starts[j]) * f if j <= k else 0.0 for j in range(self.stages)]

            def move(states: list[torch.Tensor], v: list[torch.Tensor], df: float) -> list[torch.Tensor]:
                return [x + (ends[j] - starts[j]) * df * v[j] if j <= k else x for j, x in enumerate(states)]

            for f0, f1 in zip(frac[:-1], frac[1:]):
                df = f1 - f0
                v1 = velocity(xs, at(f0), k)
                if self.solver == "euler":
                    xs = move(xs, v1, df)
                elif self.solver == "heun":
                    v2 = velocity(move(xs, v1, df), at(f1), k)
                    xs = move(xs, [0.5 * (a + b_) for a, b_ in zip(v1, v2)], df)
                else:  # midpoint
                    xs = move(xs, velocity(move(xs, v1, 0.5 * df), at(f0 + 0.5 * df), k), df)
            times = [ends[j] if j <= k else 0.0 for j in range(self.stages)]
        return SampleOutput(x=reconstruct(xs), nfe=nfe)


# ---------------------------------------------------------------- the family's settings


def dfm_refusals(cfg: TrainJobConfig) -> list[Refusal]:
    """What the DFM stage objective cannot do with these values (shared by FLUX with flux.dfm=true)."""
    from pipeline.transport.objective import guidance_refusals

    tr, s, d = cfg.transport, cfg.sampler, TrainJobConfig()
    out = unless(tr.prediction == "velocity", "transport.prediction", tr.prediction,
                 "DFM trains velocity prediction only")
    out += unless(tr.loss_weight == "none", "transport.loss_weight", tr.loss_weight,
                  "loss weights apply to score/noise prediction; DFM predicts velocity")
    out += unless(s.method == "ode", "sampler.method", s.method, "the DFM stage sampler is deterministic (ode)")
    out += unless(s.solver in STAGE_SOLVERS, "sampler.solver", s.solver,
                  f"the DFM stage sampler steps with {', '.join(STAGE_SOLVERS)}")
    out += unless(s.time_shift != "auto", "sampler.time_shift", s.time_shift,
                  "the DFM stage grid takes a numeric shift (stages have different resolutions)")
    if cfg.model.dfm_stage_steps is not None and s.steps != d.sampler.steps:
        out.append(Refusal("sampler.steps", s.steps, f"model.dfm_stage_steps={cfg.model.dfm_stage_steps} "
                                                      "fixes every phase's steps"))
    if tr.mode_scale != d.transport.mode_scale:
        out += unless(tr.time_sampler == "mode", "transport.mode_scale", tr.mode_scale,
                      f"it applies to transport.time_sampler=mode only (time_sampler is {tr.time_sampler})")
    for key in ("logit_mean", "logit_std"):
        if getattr(tr, key) != getattr(d.transport, key):
            out += unless(tr.time_sampler in ("auto", "logit_normal"), f"transport.{key}", getattr(tr, key),
                          f"it applies to time_sampler auto/logit_normal only (time_sampler is {tr.time_sampler})")
    return out + guidance_refusals(cfg)


def _dfm_model_refusals(cfg: TrainJobConfig) -> list[Refusal]:
    from pipeline.families import conditional_transport_refusals

    return conditional_transport_refusals(cfg) + dfm_refusals(cfg)


DFM_TRANSPORT = frozenset(f"transport.{k}" for k in ("path", "prediction", "loss_weight", "train_eps", "sample_eps",
                                                     "time_sampler", "logit_mean", "logit_std", "mode_scale",
                                                     "polynomial_n", "vp_beta_min", "vp_beta_max"))
DFM_SAMPLER = frozenset(f"sampler.{k}" for k in ("method", "solver", "steps", "time_shift"))

register_family(FamilySpec(
    name="dfm", matches=lambda name: name.lower() == "dfm", build=DFMObjective.from_config,
    honours=(frozenset(section_fields("model")) - {"model.learn_sigma"}) | DFM_TRANSPORT | DFM_SAMPLER
    | (frozenset(section_fields("guidance")) - {"guidance.channels"}),
    refuse=_dfm_model_refusals,
    notes={"transport.resolution_shift": "DFM draws stage times itself",
           "model.learn_sigma": "DFM stage heads predict velocity only",
           **{k: "the DFM stage sampler is deterministic" for k in section_fields("sampler") if k not in DFM_SAMPLER},
           **{k: "flux.* settings apply to model.name=flux" for k in section_fields("flux")}}))
