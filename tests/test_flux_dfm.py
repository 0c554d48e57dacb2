"""Two-stage DFM on FLUX: the pretrained FLUX layers are reused, the model starts as FLUX on the finest stage,
and a LoRA fine-tune trains in process under a real DeepSpeed engine (``model=flux flux.dfm=true``)."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.config import TrainJobConfig, load_config
from pipeline.flux.dfm import (
    FluxDFMObjective,
    StageVelocity,
    is_flux_dfm,
    stage_parameters,
    to_flux_dfm,
)
from pipeline.flux.model import build_flux_model
from pipeline.flux.objective import flux_velocity
from pipeline.transport.multiscale import decompose


def _cond(b: int = 2, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 5, 32, generator=gen), torch.randn(b, 16, generator=gen)


def _key(name: str, live: dict) -> str:
    """A FLUX parameter's name in the LoRA-wrapped model (peft moves targeted weights under ``base_layer``)."""
    if name in live:
        return name
    module, _, leaf = name.rpartition(".")
    return f"{module}.base_layer.{leaf}"


def test_flux_dfm_reuses_the_flux_layers_and_starts_as_flux_on_the_finest_stage():
    torch.manual_seed(0)
    flux = build_flux_model(None, tiny=True)
    pretrained = {k: v.clone() for k, v in flux.state_dict().items()}
    dfm = to_flux_dfm(copy.deepcopy(flux))
    assert is_flux_dfm(dfm) and to_flux_dfm(dfm) is dfm
    state = dfm.state_dict()
    assert set(pretrained) <= set(state)  # every FLUX tensor keeps its name and value
    assert all(torch.equal(state[k], v) for k, v in pretrained.items())
    new = set(state) - set(pretrained)
    assert new == {n for n, _ in stage_parameters(dfm)} and all(".stages.0." in n for n in new)
    assert {n.split(".")[0] for n in new} == {"x_embedder", "time_text_embed", "norm_out", "proj_out"}

    t5, pooled = _cond()
    x = torch.randn(2, 16, 8, 8)
    coarse = torch.randn(2, 16, 4, 4)  # whatever the coarse stage holds, it has no effect at initialisation
    t = torch.tensor([[0.4, 0.3], [0.9, 0.6]])
    with torch.no_grad():
        v_coarse, v_fine = StageVelocity(dfm, t5, pooled, 2.0)([coarse, x], t)
        expected = flux_velocity(flux, x, t[:, 1], t5, pooled, 2.0)
    assert v_coarse.shape == coarse.shape and torch.equal(v_coarse, torch.zeros_like(v_coarse))
    assert torch.allclose(v_fine, expected, atol=1e-5)


def test_flux_dfm_config_selects_the_dfm_objective(tmp_path):
    cfg = load_config(TrainJobConfig, "train", ["model=flux", "flux.dfm=true", "model.dfm_stage_steps=[3,2]",
                                                f"flux.weights={tmp_path}", "flux.guidance=3.5"])
    from pipeline.objective import build_objective

    objective = build_objective(cfg, 0)
    assert isinstance(objective, FluxDFMObjective)
    assert objective.dfm.stages == 2 and objective.dfm.stage_steps == [3, 2] and objective.guidance == 3.5
    bad = cfg.model_copy(update={"flux": cfg.flux.model_copy(update={"loss_weighting": "cosmap"})})
    with pytest.raises(ValueError, match="flux.loss_weighting=cosmap"):
        build_objective(bad, 0)


def test_flux_dfm_lora_finetune_trains_in_process(ds_process_group, tmp_path):
    """The worker's model path (build_worker_model) and objective under a ZeRO-2 CPU engine: the loss of a fixed
    problem falls, the pretrained FLUX tensors are the checkpoint's (frozen, reused), the stage layers and the LoRA
    train, the EMA samples through the stage-wise sampler, and the export carries the stage layers."""
    from pipeline.data.streaming import DataInfo
    from pipeline.flux.dfm import STAGE_FILE, load_stage_layers
    from pipeline.flux.lora import load_lora, save_finetuned
    from pipeline.objective import build_objective
    from pipeline.train.ema import EMA
    from pipeline.train.engine import build_engine
    from pipeline.train.worker_setup import build_worker_model

    torch.manual_seed(0)
    build_flux_model(None, tiny=True).save_pretrained(tmp_path / "base")
    cfg = load_config(TrainJobConfig, "train", [
        "model=flux", "flux.dfm=true", "flux.mode=lora", "flux.lora_rank=4", "flux.grad_checkpointing=true",
        f"flux.weights={tmp_path / 'base'}", "model.dfm_stage_steps=[3,2]", "train.zero_stage=2", "train.lr=1e-2",
        "train.ema_decay=0.5", f"run_dir={tmp_path}"])
    info = DataInfo(kind="latents", field="latent.npy", channels=16, size=8, num_classes=0, num_samples=4)
    model = build_worker_model(cfg, info)
    assert is_flux_dfm(model)
    base = build_flux_model(cfg.flux).state_dict()
    live = dict(model.named_parameters())
    for name, value in base.items():  # stage-1 (pretrained FLUX) layers: reused as loaded, and frozen
        assert torch.equal(live[_key(name, live)], value) and not live[_key(name, live)].requires_grad, name
    trained = {n for n, p in live.items() if p.requires_grad}
    stages = {n for n, _ in stage_parameters(model)}
    assert stages <= trained and trained - stages and all("lora_" in n for n in trained - stages)

    ema = EMA(model, cfg.train.ema_decay)
    engine = build_engine(model, cfg.train, micro_batch=4, world_size=1)
    objective = build_objective(cfg, info.num_classes)
    gen = torch.Generator().manual_seed(1)
    pattern = torch.randn(4, 16, 8, 8, generator=gen)
    batch = {"latent": pattern, "t5": torch.randn(4, 5, 32, generator=gen),
             "clip_pooled": torch.randn(4, 16, generator=gen)}
    start = {n: p.detach().clone() for n, p in stage_parameters(model)}
    losses = []
    for _ in range(15):
        torch.manual_seed(2)  # same stage draw, times and noise every step: the loss of one fixed problem
        loss = objective.loss(engine, batch)
        engine.backward(loss)
        engine.step()
        ema.update(engine.module)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert all(torch.equal(live[_key(n, live)], v) for n, v in base.items())  # the base did not move
    assert any(not torch.equal(p, start[n]) for n, p in stage_parameters(model))  # the new stage layers train

    parts = decompose(pattern, 2)
    assert [p.shape[-1] for p in parts] == [4, 8]
    out = objective.sample(ema.model, {"t5": batch["t5"][:2], "clip_pooled": batch["clip_pooled"][:2]},
                           (2, 16, 8, 8), torch.Generator().manual_seed(0))
    assert out.nfe == 5 and out.x.shape == (2, 16, 8, 8) and torch.isfinite(out.x).all()

    export = save_finetuned(engine.module, cfg.flux, tmp_path / "export")
    assert (export / STAGE_FILE).is_file()
    reloaded = load_stage_layers(load_lora(build_flux_model(cfg.flux), export), export)
    t5, pooled = _cond()
    x = [torch.randn(2, 16, 4, 4), torch.randn(2, 16, 8, 8)]
    t = torch.tensor([[0.5, 0.2], [0.8, 0.4]])
    with torch.no_grad():
        got = StageVelocity(reloaded.eval(), t5, pooled, 1.0)(x, t)
        want = StageVelocity(engine.module.eval(), t5, pooled, 1.0)(x, t)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, want))
