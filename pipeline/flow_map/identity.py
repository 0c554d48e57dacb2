"""The MeanFlow identity and its training target (REFERENCE.md section 11, t = 0 noise, t = 1 data).

Differentiating ``(r - s) u(x_s, s, r) = integral_s^r v(x_tau, tau) dtau`` in s along the trajectory gives
``u(x_s, s, r) = v(x_s, s) + (r - s) d/ds u``, with the total derivative ``d/ds u = (v . grad_x) u + partial_s u``:
the directional derivative of ``(x, s) -> u(x, s, r)`` along ``(v, 1)`` (r fixed). The regression target is
``u_tgt = sg(v + (r - s) d/ds u_theta)``.

Two ways to get ``d/ds u_theta``:
- ``func``: ``torch.func.jvp``, one forward-mode pass (attention runs on PyTorch's math kernel, as the fused
  kernels have no forward-mode derivative);
- ``finite_difference``: ``(u(x + e v, s + e) - u(x - e v, s - e)) / (2 e)`` under ``no_grad`` (error O(e^2));
  two extra forward passes, but it runs wherever a forward pass runs (ZeRO-3 partitioned weights, fused kernels,
  activation checkpointing).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from pipeline.errors import FlowrailError, first_line

UFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, s) -> u(x, s, r), r and labels bound


class JVPUnsupported(FlowrailError):
    """The model cannot run forward-mode AD (``flow_map.jvp=func``)."""


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def u_and_derivative(u_fn: UFn, x: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                     mode: Literal["func", "finite_difference"] = "func",
                     eps: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u_theta(x, s), d/ds u_theta)`` along the tangent ``(v, 1)``; ``u`` keeps its graph, the derivative not."""
    if mode == "func":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel([SDPBackend.MATH]):
                u, du = torch.func.jvp(u_fn, (x, s), (v.to(x.dtype), torch.ones_like(s)))
        except (NotImplementedError, RuntimeError) as exc:
            if "forward" not in str(exc).lower() and "jvp" not in str(exc).lower():
                raise
            raise JVPUnsupported(f"flow_map.jvp=func: this model cannot run forward-mode AD "
                                 f"({first_line(exc, 120)}); use flow_map.jvp=finite_difference") from None
        return u, du.detach()
    if mode == "finite_difference":
        u = u_fn(x, s)
        with torch.no_grad():
            dx = eps * v.to(x.dtype)
            du = (u_fn(x + dx, s + eps) - u_fn(x - dx, s - eps)) / (2 * eps)
        return u, du
    raise ValueError(f"flow_map.jvp={mode!r} is unknown (allowed: func, finite_difference)")


def meanflow_target(du_ds: torch.Tensor, v: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``sg(v + (r - s) d/ds u)``."""
    return (v + _bcast(r - s, v) * du_ds).detach()


def adaptive_loss(u: torch.Tensor, target: torch.Tensor, power: float, eps: float) -> torch.Tensor:
    """Mean over the batch of ``sg(w) * l`` with ``l`` the per-sample mean squared error and
    ``w = 1 / (l + c)^p`` (MeanFlow's adaptive weight; p = 0 is the plain squared error)."""
    per_sample = (u.float() - target.float()).pow(2).flatten(1).mean(1)
    if power == 0:
        return per_sample.mean()
    weight = (per_sample.detach() + eps).pow(-power)
    return (weight * per_sample).mean()
