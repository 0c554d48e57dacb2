"""``flowrail <command> ...``: dispatch to ``jobs/<command>.py:main(argv) -> int``.

User errors (bad config, missing files, corrupt shards, refused sensitive data, bad checkpoints) are printed as
one line and exit with code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import importlib
import os
import sys

COMMANDS = {
    "run": ("jobs.run", "make digits shards if missing, train, sample, log (the embedded default)"),
    "shards": ("jobs.shards", "write WebDataset shards: `shards digits --out DIR` or `shards images SRC --out DIR`"),
    "train": ("jobs.train", "train or fine-tune a model with Ray Train + DeepSpeed"),
    "evaluate": ("jobs.evaluate", "evaluate a checkpoint with any sampler: `evaluate CKPT sampler.steps=50 ...` (fd_digits/FID to MLflow)"),
    "privacy": ("jobs.privacy", "privacy stage: `privacy mark|release|train|audit ...` (noisy release, SFBD flow, audit)"),
    "encode": ("jobs.encode", "pre-encode pixel shards into autoencoder latent shards: `encode --vae DIR --src SHARDS --out DIR`"),
    "flux_encode": ("jobs.flux_encode", "pre-encode image+caption shards for FLUX: latents + T5/CLIP text embeddings"),
    "sweep": ("jobs.sweep", "Ray Tune sweep (ASHA) over training choices + sampling sweep, ranked in MLflow"),
    "register": ("jobs.register", "register a run/checkpoint as an MLflow pyfunc model: `register SRC --name N --promote-on fd_digits` (gated @champion)"),
}


def usage() -> str:
    lines = ["usage: flowrail <command> [args] [key=value ...]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import FlowrailError, first_line

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if "--verbose" in argv:  # any command: Ray's per-dataset and per-report console lines too (pipeline.console)
        from pipeline.console import VERBOSE_ENV

        argv = [a for a in argv if a != "--verbose"]
        os.environ[VERBOSE_ENV] = "1"
    if not argv:
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"flowrail: unknown command '{command}' (allowed: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except (FlowrailError, FileNotFoundError, PermissionError, ValueError) as exc:
        print(f"flowrail {command}: {first_line(exc, None)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flowrail {command}: interrupted; checkpoints already written are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
