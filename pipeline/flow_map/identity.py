"""The MeanFlow identity and its training target (REFERENCE.md section 11, t = 0 noise, t = 1 data).

Differentiating ``(r - s) u(x_s, s, r) = integral_s^r v(x_tau, tau) dtau`` in s along the trajectory gives
``u(x_s, s, r) = v(x_s, s) + (r - s) d/ds u``, with the total derivative ``d/ds u = (v . grad_x) u + partial_s u``:
the directional derivative of ``(x, s) -> u(x, s, r)`` along ``(v, 1)`` (r fixed). The regression target is
``u_tgt = sg(v + (r - s) d/ds u_theta)``.

Two ways to get ``d/ds u_theta``:
- ``func``: ``torch.func.jvp``, one forward-mode pass. Attention runs on PyTorch's math kernel: in torch 2.13 the
  fused SDPA kernels have no forward-mode derivative (CPU: ``_scaled_dot_product_flash_attention_for_cpu`` raises
  "forward AD ... not implemented"; the CUDA flash/efficient kernels were not checked here, no GPU). The math kernel
  materialises the (heads, N, N) attention matrix and its tangent. Measured (CPU, one thread, SiT hidden 64 depth
  3, torch 2.13, a shared machine so +-30%): 16 tokens x batch 64: fused forward 21 ms, math forward 68 ms, math JVP
  (primal + tangent) 114 ms = 5.4x the fused forward, the finite difference's two fused forwards 34 ms; 256 tokens x
  batch 8: 26 / 54 / 336 ms (JVP 12.7x) / 53 ms. The JVP's cost grows with N^2 where a fused kernel's memory does
  not. Under bf16 autocast the JVP's relative error against an fp32 JVP is 9e-3 (same model, batch 16).
- ``finite_difference``: ``(u(x + e v, s + e) - u(x - e v, s - e)) / (2 e)`` under ``no_grad``, in fp32 with autocast
  off whatever the training precision (bf16's 8-bit mantissa cannot resolve e = 1e-3: relative error 7.6 there,
  0.85 at e = 1e-2; in fp32 8e-4 at e = 1e-3, truncation O(e^2) plus rounding ~1e-6 / e). Two extra forward
  passes, but it runs wherever a forward pass runs (ZeRO-3 partitioned weights, fused kernels, activation
  checkpointing). ``fd_fn`` is the bare module's forward (a DeepSpeed engine's own forward would switch its
  autocast back on).
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
                     eps: float = 1e-3, fd_fn: UFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u_theta(x, s), d/ds u_theta)`` along the tangent ``(v, 1)``; ``u`` keeps its graph, the derivative not.
    The finite difference evaluates ``fd_fn`` (default ``u_fn``) in fp32 with autocast off; it returns fp32."""
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
        return u, fp32_difference(fd_fn or u_fn, x, s, v, eps)
    raise ValueError(f"flow_map.jvp={mode!r} is unknown (allowed: func, finite_difference)")


@torch.no_grad()
def fp32_difference(fn: UFn, x: torch.Tensor, s: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """``(fn(x + e v, s + e) - fn(x - e v, s - e)) / (2 e)`` with fp32 inputs, autocast off on ``x``'s device."""
    x32, s32, dx = x.float(), s.float(), eps * v.float()
    with torch.autocast(device_type=x.device.type, enabled=False):
        return (fn(x32 + dx, s32 + eps).float() - fn(x32 - dx, s32 - eps).float()) / (2 * eps)


def meanflow_target(du_ds: torch.Tensor, v: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``sg(v + (r - s) d/ds u)``."""
    return (v + _bcast(r - s, v) * du_ds).detach()


def adaptive_loss(u: torch.Tensor, target: torch.Tensor, power: float, eps: float,
                  error: Literal["mean", "sum"] = "mean") -> torch.Tensor:
    """Mean over the batch of ``sg(w) * l`` with ``l`` the per-sample squared error, ``||delta||^2``
    (``error=sum``, MeanFlow's) or its mean over dimensions (``mean``), and ``w = 1 / (l + c)^p`` (MeanFlow's adaptive
    weight; p = 0 is the plain squared error; p = 1 and l >> c is ~ log l in gradient)."""
    sq = (u.float() - target.float()).pow(2).flatten(1)
    per_sample = sq.sum(1) if error == "sum" else sq.mean(1)
    if power == 0:
        return per_sample.mean()
    weight = (per_sample.detach() + eps).pow(-power)
    return (weight * per_sample).mean()
