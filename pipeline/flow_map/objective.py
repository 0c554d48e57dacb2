"""``FlowMapObjective``: a SiT trained as a flow map, behind the :class:`pipeline.objective.Objective` seam.

``loss`` (``x1`` data, ``x0 ~ N(0, I)``, ``x_t = t x1 + (1 - t) x0``, labels dropped with
``model.class_dropout_prob`` once per sample, so every forward pass of the step sees the same labels; ``v`` =
``x1 - x0`` (``flow_map.target=data``) or the teacher's velocity at ``x_t`` (``target=teacher``); the network
``u_theta(x, s, r) = model(x, s, y, target_time=r, decoupled_blocks=k)``):

- ``recipe=dmf`` (Decoupled MeanFlow's mix, default): ``0.5 (L_fm + L_mf)`` on every batch, each term with its own
  noise and times (:func:`.times.dmf_times`); ``L_fm`` regresses ``u(x_t, t, t)`` on ``v``, ``L_mf`` regresses
  ``u(x_s, s, r)`` on ``sg(v + (r - s) d/ds u_theta)``; both on ``||delta||^2`` with MeanFlow's adaptive weight.
- ``recipe=split`` (the landed one): one loss; a fraction ``ratio`` of the pairs jumps (s < r), the rest is flow
  matching (s = r); error = mean over dimensions.

Model guidance (``flow_map.guidance`` = omega > 0, either recipe): for labelled samples with ``t`` in
``[guidance_t_min, guidance_t_max]`` the velocity becomes ``v + omega sg(u(x, t, t | y) - u(x, t, t | null))`` (the
network's own instantaneous velocities), both as regression target and as the JVP tangent.

``sample``: ``sampler.method=flow_map`` jumps in ``sampler.steps`` steps (:mod:`.sampler`); any other method
integrates the instantaneous velocity ``u(x, t, t)`` (= the plain forward pass) with the transport samplers, so
a flow-map checkpoint can still be sampled as a flow model.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ConfigError, TrainJobConfig, flow_map_refusal
from pipeline.flow_map.identity import adaptive_loss, meanflow_target, u_and_derivative
from pipeline.flow_map.sampler import guided_flow_map, sample_flow_map
from pipeline.flow_map.settings import decoupled_blocks, model_depth
from pipeline.flow_map.teacher import load_teacher, teacher_velocity
from pipeline.flow_map.times import dmf_times, sample_pairs
from pipeline.transport.timesteps import image_tokens, resolve_time_shift
from pipeline.families import SampleOutput


def _bcast(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def _bare(model: nn.Module) -> nn.Module:
    """The module under a DeepSpeed engine (whose forward would re-enter its own autocast)."""
    return getattr(model, "module", model)


class FlowMapObjective:
    def __init__(self, cfg: TrainJobConfig, num_classes: int):
        refusal = flow_map_refusal(cfg)
        if refusal:
            raise ConfigError(refusal)
        self.cfg, self.fm, self.num_classes = cfg, cfg.flow_map, num_classes
        self.k = decoupled_blocks(cfg.flow_map, model_depth(cfg))
        self.teacher: nn.Module | None = None
        self.flow = None  # the transport objective, for sampler.method=ode|sde
        # sums of the unweighted per-sample squared errors since the last window (the adaptive weight makes each
        # sample's weighted loss ~1 whatever its error, so the loss curve alone does not show progress)
        self._errors: dict[str, torch.Tensor] = {}
        self._error_batches = 0
        if cfg.sampler.method != "flow_map":
            from pipeline.transport import TransportObjective

            self.flow = TransportObjective.from_config(cfg, num_classes)

    @classmethod
    def from_config(cls, cfg: TrainJobConfig, num_classes: int) -> FlowMapObjective:
        return cls(cfg, num_classes)

    # ---------------------------------------------------------------- training

    def _drop_labels(self, y: torch.Tensor) -> torch.Tensor:
        y = torch.where(y < 0, torch.full_like(y, self.num_classes), y)
        p = self.cfg.model.class_dropout_prob
        if p <= 0:
            return y
        return torch.where(torch.rand(y.shape[0], device=y.device) < p, torch.full_like(y, self.num_classes), y)

    def _velocity(self, model: nn.Module, x1: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                  y: torch.Tensor | None) -> torch.Tensor:
        """``v`` at ``(x_t, t)``: the pair's, or the teacher's; with model guidance folded in."""
        if self.fm.target == "data":
            v = x1 - x0
        else:
            if self.teacher is None:
                self.teacher = load_teacher(self.cfg, in_channels=x1.shape[1], input_size=x1.shape[-1],
                                            num_classes=self.num_classes, device=x1.device)
            v = teacher_velocity(self.teacher, xt, t, y, self.num_classes, self.fm.teacher_guidance).to(xt.dtype)
        if self.fm.guidance > 0 and y is not None:
            v = self.model_guidance(model, v, xt, t, y)
        return v

    @torch.no_grad()
    def model_guidance(self, model: nn.Module, v: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                       y: torch.Tensor) -> torch.Tensor:
        """``v + omega sg(u(x,t,t|y) - u(x,t,t|null))`` where the label was kept and t is in the interval."""
        null = torch.full_like(y, self.num_classes)
        cond, uncond = model(torch.cat([xt, xt]), torch.cat([t, t]), y=torch.cat([y, null]),
                             label_dropout=False).chunk(2)
        guided = v + self.fm.guidance * (cond - uncond).to(v.dtype)
        where = (y != self.num_classes) & (t >= self.fm.guidance_t_min) & (t <= self.fm.guidance_t_max)
        return torch.where(_bcast(where, v).bool(), guided, v)

    def _meanflow(self, model: nn.Module, x1: torch.Tensor, y: torch.Tensor | None, s: torch.Tensor,
                  r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u_theta(x_s, s, r), sg(v + (r - s) d/ds u_theta))`` for a fresh noise draw."""
        x0 = torch.randn_like(x1)
        xs = _bcast(s, x1) * x1 + (1 - _bcast(s, x1)) * x0
        v = self._velocity(model, x1, x0, xs, s, y)

        def u_fn(x: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
            return model(x, s_, y=y, target_time=r, decoupled_blocks=self.k, label_dropout=False)

        def fd_fn(x: torch.Tensor, s_: torch.Tensor) -> torch.Tensor:
            return _bare(model)(x, s_, y=y, target_time=r.float(), decoupled_blocks=self.k, label_dropout=False)

        u, du_ds = u_and_derivative(u_fn, xs, s, v, self.fm.jvp, self.fm.fd_eps, fd_fn=fd_fn)
        return u, meanflow_target(du_ds, v, s, r)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x1 = batch["image"]
        y = self._drop_labels(batch["label"]) if "label" in batch else None
        fm = self.fm
        if fm.recipe == "split":
            s, r = sample_pairs(fm, x1.shape[0], device=x1.device)
            u, target = self._meanflow(model, x1, y, s.to(x1.dtype), r.to(x1.dtype))
            self._record(meanflow=(u, target))
            return adaptive_loss(u, target, fm.weight_power, fm.weight_eps, error="mean")
        t, s, r = (a.to(x1.dtype) for a in dmf_times(fm, x1.shape[0], device=x1.device))
        x0 = torch.randn_like(x1)
        xt = _bcast(t, x1) * x1 + (1 - _bcast(t, x1)) * x0
        v = self._velocity(model, x1, x0, xt, t, y)
        u_fm = model(xt, t, y=y, label_dropout=False)  # u(x, t, t): the plain forward pass
        loss_fm = adaptive_loss(u_fm, v.detach(), fm.weight_power, fm.weight_eps, error="sum")
        u, target = self._meanflow(model, x1, y, s, r)
        loss_mf = adaptive_loss(u, target, fm.weight_power, fm.weight_eps, error="sum")
        self._record(flow_matching=(u_fm, v), meanflow=(u, target))
        return 0.5 * (loss_fm + loss_mf)

    def _record(self, **pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Add each pair's batch mean of ``||u - target||^2 / D`` (unweighted, per dimension) to the window's sums;
        kept on the device (no host sync per step)."""
        for name, (u, target) in pairs.items():
            err = (u.detach().float() - target.detach().float()).pow(2).flatten(1).mean(1).mean()
            self._errors[name] = self._errors.get(name, torch.zeros((), device=err.device)) + err
        self._error_batches += 1

    def window_values(self) -> dict[str, float]:
        """This rank's sums since the last window (``flow_matching``/``meanflow`` errors, micro-batches), reset."""
        values = {f"{name}_error_sum": float(total) for name, total in sorted(self._errors.items())}
        values["error_batches"] = float(self._error_batches)
        self._errors, self._error_batches = {}, 0
        return values

    @staticmethod
    def window_metrics(summed: dict[str, float]) -> dict[str, float]:
        """``flow_map/<loss>_sq_error``: the window's mean unweighted squared error per dimension of each loss."""
        n = max(summed.get("error_batches", 0.0), 1.0)
        return {f"flow_map/{k.removesuffix('_error_sum')}_sq_error": v / n
                for k, v in summed.items() if k.endswith("_error_sum")}

    # ---------------------------------------------------------------- sampling

    def sample(self, model: nn.Module, cond: dict[str, torch.Tensor], shape: tuple[int, ...],
               generator: torch.Generator | None = None) -> SampleOutput:
        if self.flow is not None:
            return self.flow.sample(model, cond, shape, generator)
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        g_dev = generator.device if generator is not None else device
        x0 = torch.randn(shape, generator=generator, device=g_dev).to(device=device, dtype=dtype)

        def u_fn(x: torch.Tensor, s: torch.Tensor, r: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            return model(x, s, y=y, target_time=r, decoupled_blocks=self.k)

        y = cond["label"].to(device) if "label" in cond else None
        fn = guided_flow_map(u_fn, self.num_classes, self.cfg.guidance) if y is not None else u_fn
        patch = getattr(getattr(model, "module", model), "patch_size", self.cfg.model.patch_size)
        shift = resolve_time_shift(self.cfg.sampler.time_shift, image_tokens(shape[2:], patch), default=1.0)
        return sample_flow_map(fn, x0, self.cfg.sampler.steps, shift, y=y)
