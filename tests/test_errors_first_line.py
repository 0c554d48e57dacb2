"""One-line error messages keep the line that names the problem."""
from __future__ import annotations

from pipeline.errors import first_line


def test_first_non_blank_line_cut_to_limit():
    exc = ValueError("\n  while parsing a block mapping\n  in 'config.yaml', line 3\n")
    assert first_line(exc) == "while parsing a block mapping"
    assert first_line(exc, 5) == "while"
    assert first_line(ValueError("x" * 500), None) == "x" * 500


def test_empty_message_gives_the_type_name():
    assert first_line(EOFError()) == "EOFError"
    assert first_line(RuntimeError("  \n ")) == "RuntimeError"


def test_preferred_line_wins_over_the_first():
    exc = RuntimeError("Error(s) in loading state_dict for SiT:\n\tsize mismatch for x_embedder.weight: copying a "
                       "param with shape [96, 4] ...")
    assert first_line(exc, prefer="size mismatch").startswith("size mismatch for x_embedder.weight")
    assert first_line(RuntimeError("Missing key(s)"), prefer="size mismatch") == "Missing key(s)"
