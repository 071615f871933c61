"""Execution: find the notebooks, make sure a kernel runs this Python, run each with papermill, and build the
report (pages, navigation, index); the ``report`` command's options."""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import MoERoutingError, NotebookNotFoundError, ReportError, UsageError
from .browser import screenshot_report
from .render import (
    PLOTLYJS_FILE,
    NotebookResult,
    add_navigation,
    render_html,
    run_facts,
    write_index,
    write_plotlyjs,
)

log = logging.getLogger(__name__)

NOTEBOOK_PATTERN = re.compile(r"^\d{2}_[\w.-]*\.py$")


# --------------------------------------------------------------------------------------------- kernel
def ensure_kernel(name: str = "python3") -> str:
    """Make sure a Jupyter kernel ``name`` runs this interpreter (the one that has ``moe_routing``).

    A spec whose command is plain ``python`` is fine (jupyter_client starts it with ``sys.executable``).
    A missing spec is installed into ``sys.prefix`` (``ipykernel install --sys-prefix``). Returns the spec's
    directory.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    plain = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}

    def usable(spec: Any) -> bool:
        exe = spec.argv[0] if spec.argv else ""
        if exe in plain:
            return True
        try:
            return (
                Path(exe).resolve() == Path(sys.executable).resolve()
                or Path(exe).parent.resolve() == Path(sys.executable).parent.resolve()
            )
        except OSError:
            return False

    ksm = KernelSpecManager()
    try:
        spec = ksm.get_kernel_spec(name)
        if usable(spec):
            return spec.resource_dir
        log.warning(
            "kernel %r runs %s, not %s; installing one into %s",
            name,
            spec.argv[0],
            sys.executable,
            sys.prefix,
        )
    except NoSuchKernel:
        log.info("no Jupyter kernel %r; installing one into %s", name, sys.prefix)
    from ipykernel.kernelspec import install

    path = install(kernel_name=name, prefix=sys.prefix, display_name=f"Python 3 ({Path(sys.prefix).name})")
    spec = KernelSpecManager().get_kernel_spec(name)
    if not usable(spec):
        raise ReportError(
            f"Jupyter kernel {name!r} at {spec.resource_dir} runs {spec.argv[0]}, which is not this environment's "
            f"Python ({sys.executable}); remove that kernel spec or pass another kernel name."
        )
    return path


# --------------------------------------------------------------------------------------------- discovery
#: The project's own notebooks, next to the package in a source checkout (or an editable install).
PROJECT_NOTEBOOKS = Path(__file__).resolve().parents[3] / "notebooks"


def project_notebooks() -> Path:
    """The project's ``notebooks/`` folder, wherever the command runs from; NotebookNotFoundError if absent."""
    if not PROJECT_NOTEBOOKS.is_dir():
        raise NotebookNotFoundError(
            f"the project's notebooks are not next to the package ({PROJECT_NOTEBOOKS} does not exist: an "
            "installed wheel carries no notebooks). Run from a source checkout, or pass the folder with --notebooks."
        )
    return PROJECT_NOTEBOOKS


def resolve_notebooks_dir(notebooks_dir: str | Path | None) -> Path:
    """``notebooks_dir`` as given; None, or the default ``"notebooks"`` where the current directory has none,
    is the project's folder (so the report and the demo run from any directory)."""
    if notebooks_dir is None:
        return project_notebooks()
    root = Path(notebooks_dir)
    if not root.is_dir() and str(notebooks_dir) == "notebooks" and PROJECT_NOTEBOOKS.is_dir():
        return PROJECT_NOTEBOOKS
    return root


def find_notebooks(notebooks_dir: str | Path | None = "notebooks", only: Sequence[str] | None = None) -> list[Path]:
    """The ``NN_*.py`` notebook sources in ``notebooks_dir``, in order (see :func:`resolve_notebooks_dir`).

    ``only`` keeps those whose number (``"01"``/``"1"``), stem or part of the stem matches one of the entries.
    """
    root = resolve_notebooks_dir(notebooks_dir)
    if not root.is_dir():
        raise NotebookNotFoundError(
            f"notebook folder {root} does not exist (relative paths start at {Path.cwd()}); pass the folder "
            "with the NN_*.py notebooks (--notebooks)."
        )
    paths = sorted(p for p in root.iterdir() if p.is_file() and NOTEBOOK_PATTERN.match(p.name))
    if only:
        keep = []
        for p in paths:
            num = p.name[:2]
            for sel in only:
                s = str(sel).strip()
                if (
                    (s.isdigit() and int(s) == int(num))
                    or s in {p.stem, p.name}
                    or (not s.isdigit() and s in p.stem)
                ):
                    keep.append(p)
                    break
        if not keep:
            raise NotebookNotFoundError(
                f"--only {list(only)} matches none of the notebooks in {root}: {[p.name for p in paths]}."
            )
        paths = keep
    return paths


def notebook_title(nb: Any, fallback: str) -> str:
    """The first Markdown heading of a notebook (``# Title``), else ``fallback``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                m = re.match(r"^#{1,6}\s+(.*\S)", line.strip())
                if m:
                    return m.group(1)
    return fallback


# --------------------------------------------------------------------------------------------- execution
def parse_value(text: str) -> Any:
    """``--param`` values: Python/JSON literals (``3``, ``0.5``, ``[1, 2]``, ``'x'``), true/false/none, else text."""
    low = text.strip().lower()
    if low in {"true", "false"}:
        return low == "true"
    if low in {"none", "null"}:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_params(items: Sequence[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` -> ``{"k": parsed v}``."""
    params: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UsageError(f"--param needs KEY=VALUE, got {item!r}.")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise UsageError(f"--param name {key!r} is not a Python identifier.")
        params[key] = parse_value(value)
    return params


@contextmanager
def _env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_notebook(
    source: Path,
    out_dir: Path,
    *,
    parameters: Mapping[str, Any] | None = None,
    kernel: str = "python3",
    timeout: float | None = None,
    plotlyjs: str | None = None,
) -> NotebookResult:
    """Execute one py:percent notebook into ``out_dir`` (``<stem>.ipynb`` and ``<stem>.html``; ``plotlyjs``:
    see :func:`render_html`)."""
    import jupytext
    import nbformat
    import papermill as pm

    nb = jupytext.read(source)
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": f"Python ({kernel})", "language": "python"}
    title = notebook_title(nb, source.stem)
    out_ipynb = out_dir / f"{source.stem}.ipynb"
    out_html = out_dir / f"{source.stem}.html"
    params = dict(parameters or {})
    status, error = "ok", None
    start = time.perf_counter()
    try:
        with _env(PLOTLY_RENDERER="plotly_mimetype", MPLBACKEND="module://matplotlib_inline.backend_inline"):
            pm.execute_notebook(
                nb,
                str(out_ipynb),
                parameters=params,
                kernel_name=kernel,
                cwd=str(source.parent.resolve()),
                progress_bar=False,
                log_output=False,
                request_save_on_cell_execute=False,
                execution_timeout=timeout,
            )
    except Exception as exc:  # a failing notebook is reported, not fatal for the others
        status = "failed"
        error = f"{type(exc).__name__}: {exc}".strip()
        ename = getattr(exc, "ename", None)
        if ename:
            error = f"{ename}: {getattr(exc, 'evalue', '')}".strip()
    seconds = time.perf_counter() - start
    html_name = None
    if out_ipynb.exists():
        executed = nbformat.read(out_ipynb, as_version=4)
        out_html.write_text(render_html(executed, title=title, plotlyjs=plotlyjs), encoding="utf-8")
        html_name = out_html.name
    return NotebookResult(
        name=source.stem,
        title=title,
        source=str(source),
        status=status,
        seconds=round(seconds, 2),
        html=html_name,
        ipynb=out_ipynb.name if out_ipynb.exists() else None,
        error=error,
        parameters=params,
    )


def failed_notebooks(index: str | Path) -> list[str]:
    """Names of the notebooks that failed in the report whose ``index.html`` is ``index`` (from report.json)."""
    results = json.loads((Path(index).parent / "report.json").read_text(encoding="utf-8"))
    return [r["name"] for r in results if r["status"] != "ok"]


def build_report(
    notebooks_dir: str | Path | None = "notebooks",
    out_dir: str | Path = "report",
    parameters: Mapping[str, Any] | None = None,
    kernel: str = "python3",
    *,
    only: Sequence[str] | None = None,
    timeout: float | None = None,
) -> Path:
    """Execute every ``notebooks_dir/NN_*.py`` and write ``out_dir/{name}.ipynb|.html`` and ``index.html``.

    ``parameters`` are injected into every notebook (papermill; cell tagged ``parameters``); ``timeout`` is
    per cell in seconds. Failures are recorded in the index (and ``report.json``), not raised. Returns the
    path of ``index.html``.
    """
    sources = find_notebooks(notebooks_dir, only)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ensure_kernel(kernel)
    write_plotlyjs(out)
    results = []
    for src in sources:
        log.info("running %s", src.name)
        res = run_notebook(src, out, parameters=parameters, kernel=kernel, timeout=timeout, plotlyjs=PLOTLYJS_FILE)
        log.info(
            "%s: %s in %.1f s%s", src.name, res.status, res.seconds, f" ({res.error})" if res.error else ""
        )
        results.append(res)
    (out / "report.json").write_text(
        json.dumps([asdict(r) for r in results], indent=2, default=str), encoding="utf-8"
    )
    facts = run_facts(parameters)
    (out / "run.json").write_text(json.dumps(facts, indent=2, default=str), encoding="utf-8")
    add_navigation(out, results, facts)
    return write_index(results, out, parameters=parameters, facts=facts)


def add_arguments(ap: Any) -> None:
    """The report command's options (shared by ``python -m moe_routing.report`` and ``moe-routing report``)."""
    ap.add_argument(
        "--notebooks", default="notebooks",
        help="folder with the NN_*.py notebooks (default: ./notebooks, else the project's notebooks)"
    )
    ap.add_argument("--out", default="report", help="output folder (default: report)")
    ap.add_argument(
        "--only", action="append", default=None, metavar="NN|NAME", help="run only these (repeatable)"
    )
    ap.add_argument(
        "--param", "-p", action="append", default=None, metavar="KEY=VALUE", help="notebook parameter"
    )
    ap.add_argument("--kernel", default="python3", help="Jupyter kernel name (default: python3)")
    ap.add_argument("--timeout", type=float, default=None, help="per-cell timeout in seconds")
    ap.add_argument(
        "--screenshots", action="store_true", help="also save PNGs of every page (headless Chromium)"
    )


def run(args: Any) -> int:
    """Build the report for parsed ``args``; the exit status (0 ok, 1 a notebook failed). Raises project errors."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = parse_params(args.param)
    index = build_report(args.notebooks, args.out, params, args.kernel, only=args.only, timeout=args.timeout)
    if args.screenshots:
        shots = screenshot_report(index.parent)
        print(f"screenshots: {len(shots)} in {index.parent / 'screenshots'}")
    return summarize(index)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m moe_routing.report [--only NN] [--param KEY=VALUE] ...``; exit 1 if a notebook failed,
    2 (with ``moe-routing: error: ...``) on a bad option."""
    from ..cli import Parser

    ap = Parser(prog="python -m moe_routing.report", description="Execute the notebooks and publish them as one static, offline HTML report.")
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return run(args)
    except MoERoutingError as exc:
        print(f"moe-routing: error: {exc}", file=sys.stderr)
        return 2


def summarize(index: Path) -> int:
    """Print one line about the report at ``index``; 1 if a notebook failed, else 0 (the command's exit status)."""
    n = len(json.loads((index.parent / "report.json").read_text(encoding="utf-8")))
    failed = failed_notebooks(index)
    print(f"report: {index}  ({n - len(failed)} ok, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''})")
    return 1 if failed else 0

