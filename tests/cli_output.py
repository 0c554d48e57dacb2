"""The lines a CLI call made in-process printed itself, apart from what shares its stderr.

Ray forwards worker logs (coloured, sometimes behind a progress bar's carriage return) to the driver's stderr
asynchronously, so a test's captured stderr can hold lines from an earlier test's workers; MLflow logs its store
setup there too. The CLI's own error is the one line that starts with ``flowrail <command>:``.
"""
from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def flowrail_lines(stderr: str, prefix: str = "flowrail ") -> list[str]:
    """The lines of ``stderr`` that start with ``prefix`` once ANSI escapes and carriage-return overwrites are gone."""
    clean = (_ANSI.sub("", ln).rsplit("\r", 1)[-1].strip() for ln in stderr.splitlines())
    return [ln for ln in clean if ln.startswith(prefix)]
