"""Safe loading, checked over the whole code base: anything a user can point flowrail at is read as safetensors or
with ``torch.load(weights_only=True)``; no pickle, no ``allow_pickle=True``, no unsafe YAML (issue 9, security)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["pipeline", "jobs", "privacy", "evals", "benchmarks"]


def _name(node: ast.expr) -> str:
    """Dotted name of a call target: ``torch.load``, ``np.load``, ``pickle.loads`` ..."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _kwarg(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_loads(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: reason`` for every unsafe deserialisation call in ``source``."""
    problems = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        where = f"{filename}:{node.lineno}"
        if name == "torch.load":
            flag = _kwarg(node, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{where}: torch.load without weights_only=True")
        elif name.split(".")[-1] in ("load", "loads") and name.split(".")[0] in ("pickle", "cloudpickle", "dill", "joblib"):
            problems.append(f"{where}: {name} unpickles arbitrary code")
        elif name in ("np.load", "numpy.load"):
            flag = _kwarg(node, "allow_pickle")
            if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                problems.append(f"{where}: np.load with allow_pickle")
        elif name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
            loader = _kwarg(node, "Loader")
            if name.endswith(("unsafe_load", "full_load")) or _name(loader or ast.Name("")) not in (
                    "yaml.SafeLoader", "SafeLoader", "yaml.CSafeLoader", "CSafeLoader"):
                problems.append(f"{where}: {name} without SafeLoader")
    return problems


def python_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py"))


def test_code_base_loads_only_safely() -> None:
    files = python_files()
    assert ROOT / "pipeline" / "config.py" in files  # the scan sees the code base
    problems = [p for f in files for p in unsafe_loads(f.read_text(), str(f.relative_to(ROOT)))]
    assert problems == []


@pytest.mark.parametrize("snippet", [
    "import torch\nstate = torch.load(path)",
    "import torch\nstate = torch.load(path, weights_only=False)",
    "import pickle\nobj = pickle.load(f)",
    "import numpy as np\na = np.load(p, allow_pickle=True)",
    "import yaml\nd = yaml.load(text, Loader=yaml.Loader)",
    "import yaml\nd = yaml.unsafe_load(text)",
])
def test_checker_flags_unsafe_loading(snippet: str) -> None:
    assert unsafe_loads(snippet)


def test_checker_accepts_safe_loading() -> None:
    ok = ("import torch, numpy as np, yaml\n"
          "a = torch.load(p, map_location='cpu', weights_only=True)\n"
          "b = np.load(p)\nc = np.load(p, allow_pickle=False)\n"
          "d = yaml.safe_load(t)\ne = yaml.load(t, Loader=yaml.SafeLoader)\n")
    assert unsafe_loads(ok) == []
