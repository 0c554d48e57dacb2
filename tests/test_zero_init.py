"""ZeRO-3 model construction under deepspeed.zero.Init: two gloo ranks build SiT and FLUX partitioned, each holding
about half of the weights, and the gathered weights equal the plainly built model (same seed / same files)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from pipeline.config import TrainJobConfig, load_config
from pipeline.data.streaming import DataInfo
from spawn_ranks import run_ranks

SIT = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.zero_stage=3"]
PIXELS = DataInfo(kind="pixels", field="image.npy", channels=1, size=8, num_classes=10, num_samples=8)
LATENTS = DataInfo(kind="latents", field="latent.npy", channels=16, size=4, num_classes=0, num_samples=2)


def _flux(base: Path, *extra: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, None, ["model.name=flux", f"flux.weights={base}", "flux.lora_rank=4",
                                              "flux.grad_checkpointing=false", "train.zero_stage=3", *extra])


def _gathered(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in model.parameters() if hasattr(p, "ds_id")]):
        return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()}


def _owned(model: torch.nn.Module) -> tuple[int, int]:
    """(elements this rank holds in its partitions, elements of the whole model)."""
    return (sum(p.ds_tensor.numel() for p in model.parameters()), sum(p.ds_numel for p in model.parameters()))


def _rank_main(rank: int, init_file: str, base: str) -> dict:
    import torch.distributed as dist

    from pipeline.train.worker_setup import build_worker_model

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        sit = build_worker_model(load_config(TrainJobConfig, None, SIT), PIXELS, micro_batch=4, world=2)
        flux = build_worker_model(_flux(Path(base), "flux.mode=full"), LATENTS, micro_batch=2, world=2)
        return {"sit_partitioned": all(hasattr(p, "ds_id") for p in sit.parameters()),
                     "sit_owned": _owned(sit), "sit": _gathered(sit),
                     "flux_owned": _owned(flux), "flux": _gathered(flux)}
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sit_and_flux_are_built_partitioned_with_the_plain_weights(tmp_path):
    from pipeline.flux.model import build_flux_model
    from pipeline.train.worker_setup import build_worker_model

    torch.manual_seed(0)
    build_flux_model(None, tiny=True).save_pretrained(tmp_path / "base")
    results = run_ranks(_rank_main, (str(tmp_path / "init"), str(tmp_path / "base")), nprocs=2,
                        out_dir=tmp_path / "out")
    plain_sit = dict(build_worker_model(load_config(TrainJobConfig, None, SIT[:-1]), PIXELS).named_parameters())
    plain_flux = dict(build_flux_model(_flux(tmp_path / "base").flux).named_parameters())
    for rank in (0, 1):
        r = results[rank]
        assert r["sit_partitioned"]
        for key in ("sit_owned", "flux_owned"):
            owned, total = r[key]
            assert owned <= 0.55 * total, (rank, key, owned, total)
        assert r["sit"].keys() == plain_sit.keys()
        assert all(torch.equal(r["sit"][n], p) for n, p in plain_sit.items())  # same seeded DiT initialisation
        assert r["flux"].keys() == plain_flux.keys()
        assert all(torch.equal(r["flux"][n], p) for n, p in plain_flux.items())  # streamed from the folder


def test_flux_dfm_is_refused_under_zero3_by_name(tmp_path):
    from pipeline.errors import FlowrailError
    from pipeline.train.worker_setup import build_worker_model

    with pytest.raises(FlowrailError, match="flux.dfm=true cannot be built under train.zero_stage=3"):
        build_worker_model(_flux(tmp_path, "flux.dfm=true"), LATENTS)


def test_flux_single_file_is_refused_under_zero3_by_name(tmp_path):
    from pipeline.errors import FlowrailError
    from pipeline.train.worker_setup import build_worker_model

    single = tmp_path / "flux1.safetensors"
    single.write_bytes(b"\0")
    with pytest.raises(FlowrailError, match=f"flux.weights={single}: under train.zero_stage=3"):
        build_worker_model(_flux(single), LATENTS)
