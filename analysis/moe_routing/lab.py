"""JupyterLab on the project's notebooks: ``moe-routing lab`` / ``make lab``.

The configuration lives in the checkout's ``jupyter/`` folder (jupytext's contents manager; "Jupytext Notebook"
as the default viewer of ``.py`` files). :func:`lab_environment` puts that folder first on
``JUPYTER_CONFIG_PATH`` and makes sure the kernel ``python3`` runs this interpreter, so a double-clicked
``NN_*.py`` opens as a notebook with the project's kernel, unmodified.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import NotebookNotFoundError

#: The project's Jupyter configuration (a source checkout's ``jupyter/`` folder).
JUPYTER_CONFIG = Path(__file__).resolve().parents[2] / "jupyter"
#: The JupyterLab setting that opens Python files as notebooks: (plugin id, key, file type, viewer).
DEFAULT_VIEWER = ("@jupyterlab/docmanager-extension:plugin", "defaultViewers", "python", "Jupytext Notebook")


def config_dir() -> Path:
    """The ``jupyter/`` configuration folder; NotebookNotFoundError outside a source checkout."""
    if not (JUPYTER_CONFIG / "jupyter_server_config.json").is_file():
        raise NotebookNotFoundError(
            f"the project's Jupyter configuration is not next to the package ({JUPYTER_CONFIG} has no "
            "jupyter_server_config.json: an installed wheel carries no notebooks). Run from a source checkout."
        )
    return JUPYTER_CONFIG


def lab_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``env`` (default ``os.environ``) with the project's configuration first on
    ``JUPYTER_CONFIG_PATH``."""
    out = dict(os.environ if env is None else env)
    paths = [str(config_dir())]
    if out.get("JUPYTER_CONFIG_PATH"):
        paths.append(out["JUPYTER_CONFIG_PATH"])
    out["JUPYTER_CONFIG_PATH"] = os.pathsep.join(paths)
    return out


def lab_command(notebooks: str | Path | None = None, *, app: str = "lab", extra: Sequence[str] = ()) -> list[str]:
    """argv that starts Jupyter ``app`` (``lab`` or ``server``) on ``notebooks`` (default: the project's)."""
    from .report import resolve_notebooks_dir

    root = resolve_notebooks_dir(notebooks)
    if not root.is_dir():
        raise NotebookNotFoundError(f"notebook folder {root} does not exist; pass the folder with --notebooks.")
    return [sys.executable, "-m", "jupyter", app, f"--ServerApp.root_dir={root.resolve()}", *extra]


def run_lab(notebooks: str | Path | None = None, *, extra: Sequence[str] = ()) -> int:
    """Start JupyterLab (blocks until it stops); the exit status."""
    from .report import ensure_kernel

    ensure_kernel("python3")
    root = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []  # containers run as root
    return subprocess.call(lab_command(notebooks, extra=[*root, *extra]), env=lab_environment())


def run(args: Any) -> int:
    """``moe-routing lab [--notebooks DIR] [jupyter lab options]``."""
    return run_lab(args.notebooks, extra=list(args.extra or []))
