"""Tiny random FLUX components in the diffusers pipeline layout, made offline (tests and smoke runs).

``write_tiny_flux_pipeline(root, captions)`` writes::

    root/model_index.json
    root/transformer/        FluxTransformer2DModel (tiny_flux_config)
    root/vae/                AutoencoderKL, 16 latent channels, 2x downsampling, FLUX shift/scale factors
    root/text_encoder/       CLIPTextModel (hidden 16 = pooled_projection_dim)   + root/tokenizer/
    root/text_encoder_2/     T5EncoderModel (d_model 32 = joint_attention_dim)  + root/tokenizer_2/

Tokenizers are word-level ``tokenizers`` models fitted on ``captions`` and wrapped in ``PreTrainedTokenizerFast``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch

from pipeline.flux.model import tiny_flux_config

FLUX_SHIFT, FLUX_SCALE = 0.1159, 0.3611  # FLUX.1 autoencoder's shift_factor / scaling_factor
SPECIALS = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def tiny_tokenizer(captions: Iterable[str]):
    """A word-level fast tokenizer over the words of ``captions``; sequences are ``[BOS] words [EOS]``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for c in captions for w in c.lower().split()})
    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                       special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                   eos_token="[EOS]")


def write_tiny_flux_pipeline(root: str | Path, captions: Iterable[str], seed: int = 0,
                             guidance_embeds: bool = True) -> Path:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = Path(root)
    captions = list(captions)
    torch.manual_seed(seed)
    cfg = tiny_flux_config(guidance_embeds)
    FluxTransformer2DModel.from_config(cfg).save_pretrained(root / "transformer")
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4, sample_size=32, shift_factor=FLUX_SHIFT,
                  scaling_factor=FLUX_SCALE, use_quant_conv=False, use_post_quant_conv=False,
                  ).save_pretrained(root / "vae")
    for folder, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tok = tiny_tokenizer(captions)
        tok.save_pretrained(root / folder)
        ids = dict(vocab_size=len(tok), pad_token_id=0, bos_token_id=2, eos_token_id=3)
        if encoder == "text_encoder":
            model = CLIPTextModel(CLIPTextConfig(hidden_size=cfg["pooled_projection_dim"], intermediate_size=32,
                                                 num_hidden_layers=1, num_attention_heads=2,
                                                 max_position_embeddings=77, projection_dim=16, **ids))
        else:
            model = T5EncoderModel(T5Config(d_model=cfg["joint_attention_dim"], d_kv=8, d_ff=64, num_layers=1,
                                            num_heads=2, decoder_start_token_id=0, **ids))
        model.save_pretrained(root / encoder)
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"]}, indent=2))
    return root
