"""Per-rank bytes of the full-size models, counted on the meta device with DeepSpeed's partition rule.

The machine this ran on cannot hold SiT-XL/2 (28 blocks) or a full fine-tune of the FLUX-width model with AdamW
(16+ GB), so their per-rank bytes are counted from the parameter shapes alone (no memory allocated), with the rule
the measured ZeRO-3 and world-1 runs of ``run.py`` match to the byte (ZeRO-2 world-2 gradients measured ~30% higher;
fp32 weights and AdamW; ``n`` a parameter's elements, ``w`` the world size):

- ZeRO-2: params = every parameter in full; grads = ``T / w``; optimizer = 3 ``T / w`` (fp32 master + 2 moments);
  EMA = ``T`` (``T`` = trained elements; DeepSpeed pads the flat partition by < ``w`` elements, ignored);
- ZeRO-3: params = sum over all parameters of ``ceil(n / w)``; grads, EMA = the same sum over trained ones;
  optimizer = 3 times it.

    PYTHONPATH=$PWD python -m benchmarks.memory.predict
"""
from __future__ import annotations

import math

import torch

from benchmarks.memory.run import FLUX1_1X1


def per_rank(sizes: list[tuple[int, bool]], world: int, stage: int) -> dict[str, int]:
    """Bytes per rank from ``(elements, trained)`` pairs, fp32 (4 bytes an element)."""
    trained = sum(n for n, t in sizes if t)
    if stage == 3:
        part = sum(math.ceil(n / world) for n, t in sizes if t)
        return {"params": 4 * sum(math.ceil(n / world) for n, _ in sizes), "grads": 4 * part,
                "optimizer": 12 * part, "ema": 4 * part}
    return {"params": 4 * sum(n for n, _ in sizes), "grads": 4 * trained // world,
            "optimizer": 12 * trained // world, "ema": 4 * trained}


def model_sizes(name: str) -> list[tuple[int, bool]]:
    with torch.device("meta"):
        if name.startswith("flux"):
            from diffusers import FluxTransformer2DModel

            model = FluxTransformer2DModel.from_config(FLUX1_1X1)
            if name == "flux_lora":
                from pipeline.config import FluxConfig
                from pipeline.flux.lora import lora_config

                model.requires_grad_(False)
                model.add_adapter(lora_config(FluxConfig(lora_rank=16)))
        else:
            from pipeline.models import build_sit

            model = build_sit("SiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    return [(p.numel(), p.requires_grad) for p in model.parameters()]


def main() -> None:
    print("| model | ZeRO | world | params | grads | optimizer | EMA | total per rank | total / world-1 total |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("flux_lora", "flux_full", "sit_xl2_28"):
        sizes = model_sizes(name)
        for stage in (2, 3):
            base = sum(per_rank(sizes, 1, stage).values())
            for world in (1, 2):
                b = per_rank(sizes, world, stage)
                total = sum(b.values())
                cells = " | ".join(f"{b[k] / 2**30:.2f}" for k in ("params", "grads", "optimizer", "ema"))
                print(f"| {name} | {stage} | {world} | {cells} | {total / 2**30:.2f} | {total / base:.3f} |")


if __name__ == "__main__":
    main()
