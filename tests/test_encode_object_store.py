"""``flowrail encode`` from and to an S3-compatible object store (moto's server on 127.0.0.1, tests/s3_server.py)."""
from __future__ import annotations

import numpy as np
import torch

from cli_output import flowrail_lines
from pipeline.data.encode import encode_pixels, load_vae, to_vae_input
from pipeline.data.shards import iter_samples, read_manifest, write_shard_set
from pipeline.data.sources import digits_split
from s3_server import make_bucket
from test_encode import tiny_vae  # noqa: F401 - the module's tiny AutoencoderKL fixture


def test_encode_reads_and_writes_s3(ray_local, s3_server, tiny_vae, capsys) -> None:  # noqa: F811
    """A folder of two shard sets on S3 in, latent shard sets of the same names on S3 out, each latent as the
    autoencoder gives it; a prefix holding no shard set is one line, exit 2."""
    from jobs.cli import main

    bucket = make_bucket()
    images, labels = digits_split()["val"]
    sizes = {"a": 40, "b": 24}
    for name, n in sizes.items():
        write_shard_set(f"{bucket}/pixels/{name}",
                        ((f"{name}{i:03d}", {"image.npy": images[i], "cls": int(labels[i])}) for i in range(n)),
                        samples_per_shard=16, extra={"kind": "pixels", "field": "image.npy", "shape": [1, 8, 8],
                                                     "num_classes": 10})
    out = f"{bucket}/latents"
    rc = main(["encode", "--vae", str(tiny_vae), "--src", f"{bucket}/pixels", "--out", out, "--size", "16",
               "--batch-size", "16", "--samples-per-shard", "32"])
    assert rc == 0
    for name, n in sizes.items():
        m = read_manifest(f"{out}/{name}")
        assert m["kind"] == "latents" and m["shape"] == [4, 8, 8] and m["num_samples"] == n
        assert m["source"] == f"{bucket}/pixels/{name}" and len(m["shards"]) == -(-n // 32)
    src = dict(iter_samples(f"{bucket}/pixels/a"))
    enc = dict(iter_samples(f"{out}/a"))
    assert list(enc) == list(src)  # order and keys preserved
    keys = list(src)[:4]
    pixels = torch.from_numpy(np.stack([src[k]["image.npy"] for k in keys])).permute(0, 3, 1, 2).float() / 127.5 - 1
    expected = encode_pixels(load_vae(tiny_vae), to_vae_input(pixels, 3, 16), 0.18215)
    assert torch.allclose(torch.from_numpy(np.stack([enc[k]["latent.npy"] for k in keys])), expected, atol=1e-5)

    capsys.readouterr()
    rc = main(["encode", "--vae", str(tiny_vae), "--src", f"{bucket}/no-such-prefix", "--out", out])
    err = flowrail_lines(capsys.readouterr().err)
    assert rc == 2 and len(err) == 1 and f"{bucket}/no-such-prefix" in err[0], err
