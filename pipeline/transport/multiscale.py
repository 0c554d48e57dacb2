"""Decomposable Flow Matching (DFM, REFERENCE.md section 6): Laplacian pyramid, stage-wise training and sampling.

Pyramid (S stages, coarse first): ``g_{S-1} = x``, ``g_{s-1} = down(g_s)``; stage 0 is ``g_0`` and stage ``s`` is
``g_s - up(g_{s-1})``. Reconstruction ``r_0 = stage_0``, ``r_s = up(r_{s-1}) + stage_s`` returns ``x`` exactly (up to
float rounding), whatever the resampling; here down/up are bilinear x1/2 and x2.

Training (t = 0 noise, t = 1 data, each stage its own flow ``x_t,s = alpha(t_s) x1_s + sigma(t_s) x0_s``):
pick a stage ``q ~ p_q``; ``t_q ~ logit-normal(m, s)``; earlier stages ``t ~ logit-normal(1.5, 1)`` (nearly clean);
later stages are pure noise: their inputs are zeroed, their time is 0 and their loss is masked. The loss is the mean
over active stages (``s <= q``) of the per-stage mean squared velocity error.

Sampling: phase ``k`` starts stage ``k`` from noise and runs ``steps[k]`` Euler steps taking it from 0 to ``tau``
(to 1 in the last phase) while every earlier stage ``j`` moves on to ``1 - (1 - tau)^(k - j + 1)`` (to 1 in the last
phase); stages not yet started are zero with time 0, as in training. Two stages with steps [30, 10]: stage 0 goes
0 -> tau alone in 30 steps, then both finish in 10 (stage 0 tau -> 1, stage 1 0 -> 1). NFE = sum(steps).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import GuidanceConfig, TrainJobConfig
from pipeline.objective import SampleOutput
from pipeline.transport.paths import LinearPath, Path, build_path


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

    def __post_init__(self) -> None:
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
        return cls(stages=m.dfm_stages, stage_probs=list(probs), stage_steps=list(steps), threshold=m.dfm_threshold,
                   path=build_path(tr), logit_mean=tr.logit_mean, logit_std=tr.logit_std,
                   guidance=cfg.guidance, num_classes=num_classes)

    # ------------------------------------------------------------ training

    def sample_times(self, n: int, device: torch.device | str = "cpu",
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample stage ``q`` (n,) and times (n, S): earlier nearly clean, q logit-normal, later 0."""
        g_dev = generator.device if generator is not None else device
        probs = torch.tensor(self.stage_probs, dtype=torch.float, device=g_dev)
        q = torch.multinomial(probs.expand(n, -1), 1, generator=generator).squeeze(1)
        z = torch.randn(n, self.stages, generator=generator, device=g_dev)
        idx = torch.arange(self.stages, device=g_dev)[None]
        t_q = torch.sigmoid(self.logit_mean + self.logit_std * z)
        t_clean = torch.sigmoid(self.clean_mean + self.clean_std * z)
        t = torch.where(idx < q[:, None], t_clean, torch.where(idx == q[:, None], t_q, torch.zeros_like(z)))
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
        for k, (steps, ends) in enumerate(zip(self.stage_steps, phase_end_times(self.stages, self.threshold))):
            xs[k] = torch.randn(b, c, *sizes[k], generator=generator, device=g_dev).to(device=device, dtype=dtype)
            starts = list(times)
            for i in range(steps):
                cur = [starts[j] + (ends[j] - starts[j]) * i / steps if j <= k else 0.0 for j in range(self.stages)]
                t = torch.tensor(cur, device=device, dtype=dtype)[None].expand(b, -1)
                v = self._velocity(model, xs, t, y, cur[k])
                nfe += 1
                for j in range(k + 1):
                    xs[j] = xs[j] + (ends[j] - starts[j]) / steps * v[j].to(dtype)
            times = [ends[j] if j <= k else 0.0 for j in range(self.stages)]
        return SampleOutput(x=reconstruct(xs), nfe=nfe)
