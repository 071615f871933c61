"""The project skeleton stays consistent: environment.yml follows pyproject, no pickle, safe defaults."""

import re
import subprocess
import sys
from pathlib import Path

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


def test_no_pickle_in_the_library():
    src = "\n".join(p.read_text() for p in (ROOT / "analysis" / "moe_routing").rglob("*.py"))
    assert "import pickle" not in src and "allow_pickle=True" not in src
    for line in src.splitlines():
        if "torch.load(" in line:
            assert "weights_only=True" in line, line
    assert "trust_remote_code=True" not in src


def test_cli_help_and_error_exit_code(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moe_routing", "capture", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--logits" in out.stdout and "--max-tokens" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "moe_routing", "info", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "no manifest.json" in bad.stderr
