"""Times of flow-map training pairs and of few-step sampling (t = 0 noise, t = 1 data).

Training, ``recipe=split``: two times ``a, b`` from ``flow_map.time_sampler`` (uniform or logit-normal
``sigmoid(N(m, std))``); a fraction ``flow_map.ratio`` of pairs jumps from ``s = min(a, b)`` to ``r = max(a, b)``, the
rest has ``s = r = a`` (plain flow matching: ``u(x, s, s) = v(x, s)``).
Training, ``recipe=dmf`` (Decoupled MeanFlow's): per sample a flow-matching time ``t ~ sigmoid(N(fm_logit_mean, std))``
and a MeanFlow pair from two draws ``a ~ sigmoid(N(m_1, std))``, ``b ~ sigmoid(N(m_2, std))`` with
``(m_1, m_2) = mf_logit_means`` (-0.4, 1.2: the authors' 0.4, -1.2 with t flipped), ``s = min(a, b)``, ``r = max``.
Sampling: the grid ``s_k = shift(k / K)`` with the FLUX/SD3 time shift of ``sampler.time_shift`` (1 = uniform).
"""
from __future__ import annotations

import torch

from pipeline.config import FlowMapConfig
from pipeline.transport.timesteps import sample_logit_normal, sample_uniform, shift_time


def _draw(cfg: FlowMapConfig, n: int, device: torch.device | None) -> torch.Tensor:
    if cfg.time_sampler == "logit_normal":
        return sample_logit_normal(n, cfg.logit_mean, cfg.logit_std, device=device)
    return sample_uniform(n, device=device)


def sample_pairs(cfg: FlowMapConfig, n: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, r)``, each (n,), with ``s <= r``; ``s < r`` (almost surely) for a fraction ``cfg.ratio`` of them."""
    a, b = _draw(cfg, n, device), _draw(cfg, n, device)
    jump = torch.rand(n, device=device) < cfg.ratio
    s = torch.where(jump, torch.minimum(a, b), a)
    r = torch.where(jump, torch.maximum(a, b), a)
    return s, r


def dmf_times(cfg: FlowMapConfig, n: int, device: torch.device | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t_fm, s, r)``, each (n,): the flow-matching term's times and the MeanFlow term's pairs (``s <= r``)."""
    t = sample_logit_normal(n, cfg.fm_logit_mean, cfg.logit_std, device=device)
    a = sample_logit_normal(n, cfg.mf_logit_means[0], cfg.logit_std, device=device)
    b = sample_logit_normal(n, cfg.mf_logit_means[1], cfg.logit_std, device=device)
    return t, torch.minimum(a, b), torch.maximum(a, b)


def sampling_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``0 = s_0 < s_1 < ... < s_K = 1`` (float64), uniform then time-shifted."""
    if steps < 1:
        raise ValueError(f"sampler.steps={steps} must be >= 1 for flow-map sampling")
    return shift_time(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), shift)
