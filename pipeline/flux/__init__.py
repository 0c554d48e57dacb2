"""FLUX fine-tuning (REFERENCE.md sections 1, 4, 9): one module per job, imported lazily (diffusers is heavy).

- ``model``: ``FluxTransformer2DModel`` from a local diffusers folder or an original-format single file; tiny configs
- ``packing``: 2x2 latent packing, RoPE position ids, autoencoder shift/scale
- ``objective``: rectified flow in flowrail's time convention (FLUX sigma only at the model boundary), Euler sampler
- ``lora``: LoRA (peft) / full fine-tune set-up; saving as a diffusers LoRA file or a diffusers folder
- ``encode``: Ray Data pre-encoding of image + caption shards into latents + T5/CLIP embeddings
- ``export``: a training checkpoint -> LoRA file / diffusers folder, logged to MLflow
- ``tiny``: tiny random FLUX pipeline components written offline (tests, smoke runs)
"""
