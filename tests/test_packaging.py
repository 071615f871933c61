"""The project skeleton stays consistent: environment.yml follows pyproject, no pickle, safe defaults."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_in_step_with_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    torch_pin = next(p for p in pip if p.startswith("torch"))
    version = torch_pin.split("==")[1]
    torch_range = next(d for d in project["dependencies"] if d.startswith("torch"))
    upper = re.search(r"<([\d.]+)", torch_range).group(1)
    assert tuple(map(int, version.split("."))) < tuple(map(int, upper.split(".")))
    extras = re.search(r"-e \.\[(.*)\]", " ".join(pip)).group(1).split(",")
    assert set(extras) >= {"notebooks"} and set(extras) <= set(project["optional-dependencies"])
    py = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert py.split("=")[1] >= project["requires-python"].lstrip(">=")


def test_makefile_installs_cpu_torch_first():
    make = (ROOT / "Makefile").read_text()
    assert make.index("TORCH_SPEC)") < make.index('-e ".[notebooks,dev]"')
    assert "make test" in (ROOT / ".ci" / "run").read_text()


PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "shelve", "joblib"}


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Places in Python ``source`` that may unpickle data, found on the syntax tree (strings and comments do not
    count): pickle-family imports (plain, aliased, ``from ... import``, ``importlib``/``__import__``),
    ``torch.load`` (by any alias) without ``weights_only=True``, ``allow_pickle=True``, ``pandas.read_pickle``,
    ``trust_remote_code=True``."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    torch_names = {"torch"}
    load_names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLE_MODULES:
                    found.append(f"{filename}:{node.lineno}: import {a.name}")
                if a.name == "torch":
                    torch_names.add(a.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in PICKLE_MODULES:
                found.append(f"{filename}:{node.lineno}: from {node.module} import ...")
            if node.module == "torch":
                load_names |= {a.asname or a.name for a in node.names if a.name == "load"}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        is_torch_load = (isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name)
                         and f.value.id in torch_names) or (isinstance(f, ast.Name) and f.id in load_names)
        weights_only = kw.get("weights_only")
        if is_torch_load and not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
            found.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
        for key in ("allow_pickle", "trust_remote_code"):
            value = kw.get(key)
            if isinstance(value, ast.Constant) and value.value is True:
                found.append(f"{filename}:{node.lineno}: {key}=True")
        if name == "read_pickle":
            found.append(f"{filename}:{node.lineno}: read_pickle")
        if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).split(".")[0] in PICKLE_MODULES:
            found.append(f"{filename}:{node.lineno}: {name}({node.args[0].value!r})")
    return found


BAD_SNIPPETS = [
    "import pickle",
    "import pickle as pk\npk.loads(b'')",
    "from pickle import loads",
    "from _pickle import Unpickler",
    "import dill",
    "import importlib\nimportlib.import_module('pickle')",
    "__import__('cloudpickle')",
    "import torch\ntorch.load('x.pt')",
    "import torch\ntorch.load('x.pt', weights_only=False)",
    "import torch as T\nT.load('x.pt')",
    "from torch import load as L\nL('x.pt')",
    "import numpy as np\nnp.load('x.npy', allow_pickle=True)",
    "import pandas as pd\npd.read_pickle('x.pkl')",
    "m = f('x', trust_remote_code=True)",
]


@pytest.mark.parametrize("snippet", BAD_SNIPPETS)
def test_the_pickle_scanner_catches(snippet):
    assert unsafe_loads(snippet), snippet


def test_the_pickle_scanner_passes_safe_code():
    safe = (
        '"""Never import pickle here."""\n# import pickle\nimport torch\n'
        "torch.load('x.pt', weights_only=True)\nimport numpy as np\nnp.load('x.npy')\n"
        "x = 'torch.load(f)'\nmodel = f(trust_remote_code=False)\n"
    )
    assert unsafe_loads(safe) == []


def test_no_pickle_in_the_library():
    files = sorted((ROOT / "analysis" / "moe_routing").rglob("*.py"))
    assert len(files) > 10
    found = [hit for p in files for hit in unsafe_loads(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == []


def test_cli_help_and_error_exit_code(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moe_routing", "capture", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--logits" in out.stdout and "--max-tokens" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "moe_routing", "info", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "no manifest.json" in bad.stderr


def test_one_version_string():
    """``moe_routing.__version__`` (from ``_version.py``) is the version pyproject.toml installs."""
    import moe_routing
    from moe_routing._version import __version__

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert moe_routing.__version__ == __version__ == project["version"]
