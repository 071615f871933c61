"""Execute every ``notebooks/NN_*.py`` with its default parameters; a failing cell (or assertion cell) fails.

The demo model trains on first use (~3-4 min, cached under ``~/.cache/moe_routing``) and the demo traces are
captured once per trace directory; a session fixture makes sure they exist before the first notebook runs and
hands the same ``RUNS`` directory to every notebook. ``RUNS`` defaults to the repository's ``runs/`` (gitignored,
shared with ``make demo``, so later sessions reuse it); set ``MOE_ROUTING_TEST_RUNS`` to use another directory.
``MOE_ROUTING_NOTEBOOK_TIMEOUT`` (seconds, default 600) bounds each notebook.

Each (notebook, parameters) pair is executed once per session (``execute_notebook``); ``test_notebook_claims.py``
reads the same executed notebooks.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.py"))
TIMEOUT = float(os.environ.get("MOE_ROUTING_NOTEBOOK_TIMEOUT", "600"))

pytestmark = pytest.mark.notebooks

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@pytest.fixture(scope="session")
def runs_dir() -> Path:
    """The demo traces (trained and untrained model x heldout / train / udhr), captured when missing."""
    from moe_routing.demo_pipeline import demo_runs

    runs = Path(os.environ.get("MOE_ROUTING_TEST_RUNS", ROOT / "runs")).resolve()
    paths = demo_runs("demo", runs, progress=False)
    missing = [k for k, p in paths.items() if not (p / "manifest.json").exists()]
    assert not missing, f"demo traces were not captured: {missing}"
    return runs


@pytest.fixture(scope="session")
def kernel() -> str:
    from moe_routing.report import ensure_kernel

    ensure_kernel("python3")
    return "python3"


@dataclass(frozen=True)
class Executed:
    """One executed notebook: its run result, the executed ``.ipynb`` and the wall-clock seconds."""

    result: object  # moe_routing.report.NotebookResult
    ipynb: Path
    seconds: float


_EXECUTED: dict[tuple[str, tuple[tuple[str, str], ...]], Executed] = {}


def execute_notebook(source: Path, kernel: str, parameters: dict[str, str]) -> Executed:
    """Run ``source`` with ``parameters`` (once per session: later calls return the same executed notebook)."""
    from moe_routing.report import run_notebook

    key = (str(source), tuple(sorted(parameters.items())))
    if key not in _EXECUTED:
        out = Path(tempfile.mkdtemp(prefix=f"nb-{source.stem}-"))
        atexit.register(shutil.rmtree, out, ignore_errors=True)
        start = time.perf_counter()
        result = run_notebook(source, out, parameters=parameters, kernel=kernel, timeout=TIMEOUT)
        _EXECUTED[key] = Executed(result, out / f"{source.stem}.ipynb", time.perf_counter() - start)
    return _EXECUTED[key]


def require_ok(run: Executed, source: Path) -> None:
    """Fail with the first failing cell's source and traceback unless the notebook ran to the end."""
    if run.result.status != "ok":
        pytest.fail(f"{source.name} failed: {run.result.error}\n{failing_cell(run.ipynb)}", pytrace=False)


def failing_cell(ipynb: Path) -> str:
    """Source and traceback of the first cell with an error output in an executed notebook ('' if none)."""
    if not ipynb.exists():
        return ""
    nb = json.loads(ipynb.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb.get("cells", [])):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                source = "".join(cell.get("source", ""))
                tb = _ANSI.sub("", "\n".join(out.get("traceback", [])))
                return f"--- cell {i} ---\n{source}\n--- traceback ---\n{tb}"
    return ""


def test_notebooks_found() -> None:
    assert NOTEBOOKS, f"no NN_*.py notebooks in {NOTEBOOK_DIR}"


@pytest.mark.timeout(TIMEOUT + 120, func_only=True)  # the session fixture may capture for minutes
@pytest.mark.parametrize("source", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(source: Path, runs_dir: Path, kernel: str) -> None:
    """The notebook runs top to bottom with its defaults (on the demo model) within the time limit."""
    run = execute_notebook(source, kernel, {"RUNS": str(runs_dir)})
    require_ok(run, source)
    assert run.seconds <= TIMEOUT, f"{source.name} took {run.seconds:.0f} s, over the {TIMEOUT:.0f} s limit"
    assert run.ipynb.with_suffix(".html").exists(), "the executed notebook was not rendered to HTML"
