"""The transport: a path, what the model predicts, the training loss and the fields samplers integrate.

Training (SiT): draw t, x0 ~ N(0, I), form ``x_t = alpha x1 + sigma x0`` and regress
- velocity: ``||v_theta - (alpha' x1 + sigma' x0)||^2``
- noise:    ``w(t) ||eps_theta - x0||^2``
- score:    ``w(t) ||sigma s_theta + x0||^2``
with ``w`` = 1 ("none"), ``(drift_var / sigma)^2`` ("velocity") or ``drift_var / sigma^2`` ("likelihood"),
``drift_var = alpha'/alpha sigma^2 - sigma sigma'``. The loss weight applies to score/noise models only.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.config import TransportConfig
import pipeline.transport.predictions as P
from pipeline.transport.paths import GVPPath, LinearPath, Path, PolynomialPath, VPPath, build_path
from pipeline.transport.timesteps import image_tokens, resolve_time_shift, sample_train_times

ModelFn = Callable[..., torch.Tensor]

SDE_MIN_EPS = 1e-3  # default start of SDE sampling: the score (and SBDM's coefficient) blow up where alpha = 0


@dataclass
class TrainingLoss:
    loss: torch.Tensor  # [B], per-sample loss (mean over the non-batch dimensions)
    t: torch.Tensor  # [B], the training times used


def default_eps(path: Path, prediction: str) -> tuple[float, float]:
    """SiT's (train_eps, sample_eps) for a path x prediction pair (REFERENCE.md section 2).

    Velocity models on paths whose coefficients are finite on [0, 1] (Linear, GVP, polynomial with n >= 1) need
    none; VP uses 1e-5 for training and 1e-3 for sampling; everything else (score/noise models, LinearVP) 1e-3.
    """
    if isinstance(path, VPPath):
        return 1e-5, 1e-3
    finite = isinstance(path, (LinearPath, GVPPath)) or (isinstance(path, PolynomialPath) and path.n >= 1)
    if prediction == "velocity" and finite:
        return 0.0, 0.0
    return 1e-3, 1e-3


def model_output(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
    """Call ``model_fn(x, t[B], **kw)``; an output with twice x's channels keeps its first half (SiT learn_sigma)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    out = model_fn(x, t, **model_kwargs)
    if out.dim() > 1 and x.dim() > 1 and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
        out = out[:, : x.shape[1]]
    if out.shape != x.shape:
        raise ValueError(f"model output shape {tuple(out.shape)} does not match its input {tuple(x.shape)}")
    return out


class Transport:
    """Path + prediction type + loss weight + endpoint epsilons (train and sample handled independently)."""

    def __init__(self, path: Path, prediction: str = "velocity", loss_weight: str = "none",
                 train_eps: float | None = None, sample_eps: float | None = None,
                 time_cfg: TransportConfig | None = None, patch_size: int = 1):
        if prediction not in P.PREDICTIONS:
            P._bad(prediction)
        if loss_weight not in ("none", "velocity", "likelihood"):
            raise ValueError(f"transport.loss_weight={loss_weight!r} is unknown (allowed: none, velocity, likelihood)")
        self.path, self.prediction, self.loss_weight = path, prediction, loss_weight
        d_train, d_sample = default_eps(path, prediction)
        self.train_eps = d_train if train_eps is None else float(train_eps)
        self.sample_eps = d_sample if sample_eps is None else float(sample_eps)
        self._sample_eps_given = sample_eps is not None
        self.time_cfg = time_cfg or TransportConfig()
        self.patch_size = patch_size

    def __repr__(self) -> str:
        return (f"Transport(path={self.path!r}, prediction={self.prediction}, loss_weight={self.loss_weight}, "
                f"train_eps={self.train_eps}, sample_eps={self.sample_eps})")

    # ------------------------------------------------------------------ intervals

    def sample_interval(self, sde: bool = False, diffusion: str | None = None) -> tuple[float, float]:
        """(t0, t1) for sampling: ``[sample_eps, 1 - sample_eps]``.

        Unless sample_eps is set, an SDE starts at >= 1e-3 where its drift diverges at t = 0, as in SiT's
        ``check_interval``: the SBDM coefficient, a score/noise model, or a path without finite coefficients there.
        A velocity model on Linear/GVP with any other coefficient starts at 0 (SiT's grid).
        """
        eps0 = self.sample_eps
        finite_start = self.prediction == "velocity" and isinstance(self.path, (LinearPath, GVPPath))
        if sde and not self._sample_eps_given and (diffusion in (None, "sbdm") or not finite_start):
            eps0 = max(eps0, SDE_MIN_EPS)
        return eps0, 1.0 - self.sample_eps

    # ------------------------------------------------------------------ fields

    def velocity(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """``E[u_t | x_t = x]`` from whatever the model predicts."""
        out = model_output(model_fn, x, t, **model_kwargs)
        return P.to_velocity(out, self.prediction, self.path, x, t)

    def score(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """``grad_x log p_t(x)`` from whatever the model predicts."""
        out = model_output(model_fn, x, t, **model_kwargs)
        return P.to_score(out, self.prediction, self.path, x, t)

    def noise(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        out = model_output(model_fn, x, t, **model_kwargs)
        return P.to_noise(out, self.prediction, self.path, x, t)

    def denoised(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        """``E[x1 | x_t = x]`` (Tweedie)."""
        out = model_output(model_fn, x, t, **model_kwargs)
        return P.to_data(out, self.prediction, self.path, x, t)

    def velocity_and_score(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor,
                           **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Both fields from one model evaluation."""
        out = model_output(model_fn, x, t, **model_kwargs)
        return (P.to_velocity(out, self.prediction, self.path, x, t),
                P.to_score(out, self.prediction, self.path, x, t))

    # ------------------------------------------------------------------ training

    def num_tokens(self, x1: torch.Tensor) -> int:
        """Image tokens per sample (spatial size / patch^2 of the model's patch size), for the resolution shift."""
        return image_tokens(x1.shape[2:] if x1.dim() > 2 else x1.shape[1:], self.patch_size)

    def grid_shift(self, time_shift: float | str | None, x: torch.Tensor) -> float:
        """``sampler.time_shift`` as a number for samples shaped like ``x`` (``None``: 1, a uniform grid)."""
        return resolve_time_shift(time_shift, self.num_tokens(x), default=1.0)

    def sample_t(self, n: int, x1: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return sample_train_times(self.time_cfg, n, self.train_eps, num_tokens=self.num_tokens(x1),
                                  generator=generator, device=x1.device).to(x1.dtype)

    def training_loss(self, model_fn: ModelFn, x1: torch.Tensor, *, x0: torch.Tensor | None = None,
                      t: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      **model_kwargs) -> TrainingLoss:
        """Per-sample loss of ``model_fn(x_t, t, **model_kwargs)`` on data ``x1`` (x0, t drawn unless given)."""
        if x0 is None:
            g_dev = generator.device if generator is not None else x1.device
            x0 = torch.randn(x1.shape, generator=generator, device=g_dev, dtype=x1.dtype).to(x1.device)
        if t is None:
            t = self.sample_t(x1.shape[0], x1, generator)
        tt = P.expand_t(t, x1)
        a, s, da, ds = self.path.alpha(tt), self.path.sigma(tt), self.path.d_alpha(tt), self.path.d_sigma(tt)
        xt = a * x1 + s * x0
        out = model_output(model_fn, xt, t, **model_kwargs)
        if self.prediction == "velocity":
            err = out - (da * x1 + ds * x0)
        else:
            if self.loss_weight == "none":
                w = torch.ones_like(tt)
            else:
                drift_var = s * (da * s - a * ds) / a
                w = (drift_var / s) ** 2 if self.loss_weight == "velocity" else drift_var / s**2
            err = w.sqrt() * (out - x0 if self.prediction == "noise" else s * out + x0)
        loss = err.pow(2).flatten(1).mean(1)
        return TrainingLoss(loss=loss, t=torch.as_tensor(t).expand(x1.shape[0]))


def build_transport(cfg: TransportConfig, patch_size: int = 1) -> Transport:
    """The transport named by ``cfg`` (``patch_size`` only feeds the FLUX resolution shift's token count)."""
    return Transport(build_path(cfg), cfg.prediction, cfg.loss_weight, cfg.train_eps, cfg.sample_eps,
                     time_cfg=cfg, patch_size=patch_size)
