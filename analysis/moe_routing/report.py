"""Execute the notebooks and publish them as one static, offline HTML report.

For each ``notebooks/NN_*.py`` (jupytext py:percent) :func:`build_report` converts the source to a notebook,
executes it with papermill (parameters go into the cell tagged ``parameters``), writes the executed
``.ipynb`` and an HTML page (nbconvert; plotly figures load the report's one offline copy ``plotly.min.js``),
gives every page a navigation bar (index, previous / next) and a table of contents, and finally writes
``index.html``: what produced the report (model, corpus and any fallback, dtype, device: :func:`run_facts`),
whether a notebook failed, and every page with its sections, run time and status (``run.json``,
``report.json``).

    python -m moe_routing.report                       # all notebooks -> report/
    python -m moe_routing.report --only 01 --param trace_dir=runs/demo --param max_docs=50
"""

from __future__ import annotations

import ast
import datetime as _dt
import html
import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from .errors import MoERoutingError, NotebookNotFoundError, ReportError, UsageError

log = logging.getLogger(__name__)

NOTEBOOK_PATTERN = re.compile(r"^\d{2}_[\w.-]*\.py$")
PLOTLY_MIME = "application/vnd.plotly.v1+json"


@dataclass
class NotebookResult:
    """Outcome of one notebook: where its outputs are, how long it ran, and whether it succeeded."""

    name: str
    title: str
    source: str
    status: str  # "ok" | "failed"
    seconds: float
    html: str | None = None
    ipynb: str | None = None
    error: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


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
PROJECT_NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


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


# --------------------------------------------------------------------------------------------- html
def _plotly_outputs_to_html(nb: Any) -> int:
    """Give every plotly mimetype output a ``text/html`` rendering (a div + script, no plotly.js).

    Returns the number of figures converted. The notebook is modified in place.
    """
    import plotly.io as pio

    n = 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data") if out.get("output_type") in {"display_data", "execute_result"} else None
            if not data or PLOTLY_MIME not in data:
                continue
            spec = data[PLOTLY_MIME]
            if isinstance(spec, str):
                spec = json.loads(spec)
            fig = {k: spec[k] for k in ("data", "layout", "frames") if k in spec}
            config = {"responsive": True, "displaylogo": False, **(spec.get("config") or {})}
            data["text/html"] = pio.to_html(
                fig,
                include_plotlyjs=False,
                full_html=False,
                config=config,
                validate=False,
                div_id=f"plotly-fig-{n}",
            )
            data.pop(PLOTLY_MIME)  # nbconvert would otherwise warn about an unknown mimetype
            n += 1
    return n


#: The report's one copy of plotly.js, next to the pages (offline; cached by the browser across pages).
PLOTLYJS_FILE = "plotly.min.js"


def _plotlyjs_tag(src: str | None = None) -> str:
    """``<script>`` tags loading plotly.js: from ``src`` (a file next to the page), else inline."""
    config = '<script type="text/javascript">window.PlotlyConfig = {MathJaxConfig: "local"};</script>\n'
    if src:
        return config + f'<script type="text/javascript" charset="utf-8" src="{html.escape(src)}"></script>\n'
    from plotly.offline import get_plotlyjs

    return config + f'<script type="text/javascript" charset="utf-8">{get_plotlyjs()}</script>\n'


def write_plotlyjs(out_dir: str | Path) -> Path:
    """Write the offline plotly.js shared by every page of a report into ``out_dir``; its path."""
    from plotly.offline import get_plotlyjs

    path = Path(out_dir) / PLOTLYJS_FILE
    text = get_plotlyjs()
    if not path.is_file() or path.stat().st_size != len(text.encode("utf-8")):
        path.write_text(text, encoding="utf-8")
    return path


def render_html(nb: Any, *, title: str | None = None, plotlyjs: str | None = None) -> str:
    """HTML page of an executed notebook; plotly.js goes into ``<head>`` once (before require.js, if any):
    inline by default, or as ``<script src=plotlyjs>`` (the report's shared copy, :func:`write_plotlyjs`)."""
    import copy

    from nbconvert import HTMLExporter

    nb = copy.deepcopy(nb)
    n_figs = _plotly_outputs_to_html(nb)
    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title or "notebook"}})
    # require.js (only needed by widgets) would hold the page up offline and turn plotly.js into an AMD
    # module online; MathJax may load late without blocking the page.
    body = re.sub(r"<script[^>]*src=\"[^\"]*require(?:\.min)?\.js\"[^>]*>\s*</script>\s*", "", body)
    body = re.sub(r"<script(?![^>]*\basync\b)([^>]*src=\"[^\"]*mathjax[^\"]*\")", r"<script async\1", body)
    if n_figs:
        m = re.search(r"<head[^>]*>", body)
        if m:
            meta = re.search(r"<meta charset=[^>]*>", body)
            at = meta.end() if meta else m.end()
            body = body[:at] + "\n" + _plotlyjs_tag(plotlyjs) + body[at:]
        else:
            body = _plotlyjs_tag(plotlyjs) + body
    return body


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


# --------------------------------------------------------------------------------------------- chromium
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def _chromium(args: Sequence[str], page: Path, *, budget_ms: int, timeout: float, fragment: str = "") -> str:
    """Run headless Chromium on ``page`` (``#fragment`` appended when given) with extra ``args``; its stdout."""
    import subprocess
    import tempfile

    from .plots.export import find_browser

    exe = find_browser()
    with tempfile.TemporaryDirectory(prefix="moe-chromium-") as profile:
        cmd = [
            exe,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            *args,
        ]
        proc = subprocess.run(
            [*cmd, Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    if proc.returncode != 0:
        raise ReportError(f"chromium failed ({proc.returncode}) on {page}: {proc.stderr[-800:]}")
    return proc.stdout


def dump_dom(page: str | Path, *, budget_ms: int = 10000, timeout: float = 120, fragment: str = "") -> str:
    """The DOM of ``page`` (opened at ``#fragment`` when given) after its scripts ran (``--dump-dom``)."""
    return _chromium(["--dump-dom"], Path(page), budget_ms=budget_ms, timeout=timeout, fragment=fragment)


def screenshot(
    page: str | Path,
    png: str | Path,
    *,
    size: tuple[int, int] = (1400, 2000),
    budget_ms: int = 10000,
    timeout: float = 120,
    fragment: str = "",
) -> Path:
    """PNG screenshot of ``page`` (``size`` = window width, height in CSS pixels) by headless Chromium."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _chromium(
        [f"--screenshot={png}", f"--window-size={size[0]},{size[1]}"],
        Path(page),
        budget_ms=budget_ms,
        timeout=timeout,
        fragment=fragment,
    )
    if not png.exists():
        raise ReportError(f"chromium wrote no screenshot of {page}.")
    return png


class _FigureCensus(HTMLParser):
    """Counts, per plotly graph div, its ``svg.main-svg`` elements and drawn marks (traces, images, canvas)."""

    _VOID = frozenset(
        {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
    )

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict[str, Any]] = []
        self._stack: list[tuple[str, list[str]]] = []  # open elements inside the current figure

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if not self._stack:
            if tag == "div" and "plotly-graph-div" in cls:
                self.figures.append(
                    {"id": a.get("id"), "rendered": "js-plotly-plot" in cls, "main_svg": 0, "marks": 0}
                )
                self._stack.append((tag, cls))
            return
        fig = self.figures[-1]
        if tag == "svg" and "main-svg" in cls:
            fig["main_svg"] += 1
        elif self._is_mark(tag, cls, a, self._stack[-1][1]):
            fig["marks"] += 1
        if tag not in self._VOID:
            self._stack.append((tag, cls))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if self._stack and tag not in self._VOID and self._stack[-1][0] == tag:
            self._stack.pop()

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                return

    @staticmethod
    def _is_mark(tag: str, cls: list[str], a: dict[str, str | None], parent: list[str]) -> bool:
        """A drawn element: WebGL canvas, heatmap image, bar/marker/line path, Sankey node."""
        if tag == "canvas":
            return True
        if tag == "image":
            return bool(a.get("href") or a.get("xlink:href"))
        if tag == "path":
            marked = any(c in cls for c in ("point", "js-line", "sankey-link")) or "point" in parent
            return bool((a.get("d") or "").strip()) and marked
        return tag == "rect" and "node-rect" in cls


def rendered_figures(dom: str) -> list[dict[str, Any]]:
    """One entry per plotly figure in a dumped DOM: ``id``, ``rendered``, ``main_svg`` and ``marks`` counts.

    A figure drew something when ``main_svg > 0`` and ``marks > 0`` (bars, markers, lines, heatmap images,
    Sankey nodes/links, WebGL canvases).
    """
    census = _FigureCensus()
    census.feed(dom)
    return census.figures


def screenshot_report(out_dir: str | Path = "report", *, size: tuple[int, int] = (1400, 2000)) -> list[Path]:
    """Screenshots of ``index.html`` and every rendered notebook page into ``out_dir/screenshots/``."""
    out = Path(out_dir)
    pages = [out / "index.html", *sorted(p for p in out.glob("*.html") if p.name != "index.html")]
    return [screenshot(p, out / "screenshots" / f"{p.stem}.png", size=size) for p in pages if p.exists()]


# --------------------------------------------------------------------------------------------- provenance
def _manifests(runs: Path, limit: int = 50) -> list[tuple[str, dict[str, Any]]]:
    """(trace directory relative to ``runs``, its manifest) for the traces under ``runs`` (3 levels deep)."""
    found = []
    for pattern in ("manifest.json", "*/manifest.json", "*/*/manifest.json", "*/*/*/manifest.json"):
        for m in sorted(runs.glob(pattern)):
            try:
                found.append((str(m.parent.relative_to(runs)) or ".", json.loads(m.read_text(encoding="utf-8"))))
            except (OSError, ValueError):
                continue
            if len(found) >= limit:
                return found
    return found


def run_facts(parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """What produced a report: model, corpus (and a recorded fallback), dtype, device from the run parameters
    (``MODEL``, ``CORPUS``/``PART``, ``CORPUS_FALLBACK``, ``DTYPE``, ``DEVICE``, ``RUNS``), and per trace under
    ``RUNS`` what its manifest records (model name and type, dtype, device, tokens, versions)."""
    p = dict(parameters or {})
    facts: dict[str, Any] = {
        "model": p.get("MODEL"), "corpus": p.get("CORPUS"), "part": p.get("PART"),
        "corpus_fallback": p.get("CORPUS_FALLBACK"), "dtype": p.get("DTYPE"), "device": p.get("DEVICE"),
        "langs": p.get("LANGS"), "runs": p.get("RUNS"), "traces": [],
    }
    runs = Path(str(p["RUNS"])) if p.get("RUNS") else None
    if runs is not None and runs.is_dir():
        for rel, m in _manifests(runs):
            model: dict[str, Any] = m["model"] if isinstance(m.get("model"), dict) else {}
            settings: dict[str, Any] = m["settings"] if isinstance(m.get("settings"), dict) else {}
            facts["traces"].append({
                "trace": rel, "model": m.get("model_name") or model.get("name"),
                "model_type": m.get("model_type") or model.get("model_type"), "dtype": model.get("dtype"),
                "device": settings.get("device") or settings.get("device_map") or m.get("device"),
                "tokens": m.get("tokens"), "complete": m.get("complete"),
                "versions": m.get("versions"),
            })
    return facts


def _facts_line(facts: Mapping[str, Any]) -> str:
    """One line of HTML: model · corpus · dtype · device (what the parameters and manifests say)."""
    traces = facts.get("traces") or []
    model = facts.get("model") or next((t["model"] for t in traces if t.get("model")), None)
    dtypes = sorted({str(t["dtype"]) for t in traces if t.get("dtype")})
    dtype = facts.get("dtype")
    if dtypes and (not dtype or dtype == "auto"):
        dtype = ", ".join(dtypes) + (" (auto)" if dtype == "auto" else "")
    corpus = facts.get("corpus")
    if facts.get("part") and facts.get("part") != corpus:
        corpus = f"{corpus or ''} ({facts['part']})".strip()
    parts = [
        f"model <code>{html.escape(str(model))}</code>" if model else "model: the notebooks' default",
        f"corpus <code>{html.escape(str(corpus))}</code>" if corpus else "corpus: the notebooks' default",
        f"dtype <code>{html.escape(str(dtype))}</code>" if dtype else None,
        f"device <code>{html.escape(str(facts.get('device') or 'cpu (default)'))}</code>",
    ]
    line = " · ".join(x for x in parts if x)
    if facts.get("corpus_fallback"):
        line += (' · <span class="failed">corpus fallback</span>: ' + html.escape(str(facts["corpus_fallback"])))
    return line


# --------------------------------------------------------------------------------------------- navigation
_NAV_CSS = """<style id="mr-nav-css">
.mr-nav{font-family:Inter,'Helvetica Neue',Arial,sans-serif;font-size:14px;background:#f7f7f9;border-bottom:1px solid #ddd;
padding:.5rem 1rem;position:sticky;top:0;z-index:1000;display:flex;gap:1.2rem;align-items:baseline;flex-wrap:wrap}
.mr-nav a{color:#2b5fa8;text-decoration:none} .mr-nav a:hover{text-decoration:underline} .mr-nav .mr-facts{color:#666}
.mr-nav .mr-off{color:#aaa} .mr-toc{font-family:Inter,'Helvetica Neue',Arial,sans-serif;font-size:14px;margin:1rem 1rem 0;
padding:.6rem 1rem;border:1px solid #e4e4e4;border-radius:4px;max-width:60rem;background:#fcfcfd}
.mr-toc ol{margin:.3rem 0;padding-left:1.3rem} .mr-toc li.l3{margin-left:1.2rem;list-style:circle}
.mr-toc a{color:#2b5fa8;text-decoration:none} .mr-failed{background:#fdecea;color:#8e1c1c;padding:.7rem 1rem;
margin:1rem;border-left:4px solid #c62828;font-family:Inter,'Helvetica Neue',Arial,sans-serif}
</style>"""
_HEADING = re.compile(r"<h([1-3])\b[^>]*\bid=\"([^\"]+)\"[^>]*>(.*?)</h\1>", re.S)


def page_headings(body: str) -> list[tuple[int, str, str]]:
    """``(level, id, text)`` of the h1-h3 headings of a rendered page (the table of contents)."""
    out = []
    for level, hid, inner in _HEADING.findall(body):
        text = html.unescape(re.sub(r"<[^>]+>", "", inner)).replace("\u00b6", "").strip()
        if text:
            out.append((int(level), hid, text))
    return out


def _nav_html(r: NotebookResult, prev: NotebookResult | None, nxt: NotebookResult | None, facts_line: str,
              position: str, where: str) -> str:
    def link(x: NotebookResult | None, arrow: str) -> str:
        if x is None or not x.html:
            return f'<span class="mr-off">{arrow}</span>'
        label = f"{html.escape(x.title)}" if where == "top" else html.escape(x.name)
        return f'<a href="{html.escape(x.html)}" rel="{"prev" if arrow.startswith("←") else "next"}">{arrow} {label}</a>'

    return (f'<nav class="mr-nav mr-nav-{where}"><a href="index.html" rel="index">↑ report index</a>'
            f'{link(prev, "← previous:")}{link(nxt, "→ next:")}<span class="mr-facts">{position} · {facts_line}</span>'
            "</nav>")


def add_navigation(out_dir: str | Path, results: Sequence[NotebookResult], facts: Mapping[str, Any] | None = None
                   ) -> None:
    """Give every rendered page a navigation bar (index, previous / next notebook, what produced the report),
    a table of contents of its headings and, when its notebook failed, the error at the top. Idempotent."""
    out = Path(out_dir)
    pages = [r for r in results if r.html and (out / r.html).is_file()]
    line = _facts_line(facts or {})
    for i, r in enumerate(pages):
        path = out / str(r.html)
        body = path.read_text(encoding="utf-8")
        body = re.sub(r'<style id="mr-nav-css">.*?</style>|<nav class="mr-nav[^"]*">.*?</nav>|'
                      r'<div class="mr-(?:toc|failed)">.*?</div><!--/mr-->', "", body, flags=re.S)
        prev = pages[i - 1] if i > 0 else None
        nxt = pages[i + 1] if i + 1 < len(pages) else None
        position = f"notebook {i + 1} of {len(pages)}"
        heads = [h for h in page_headings(body) if h[0] > 1] or page_headings(body)
        toc = ""
        if heads:
            items = "".join(f'<li class="l{lv}"><a href="#{html.escape(hid)}">{html.escape(text)}</a></li>'
                            for lv, hid, text in heads)
            toc = f'<div class="mr-toc"><b>Contents</b><ol>{items}</ol></div><!--/mr-->'
        failed = (f'<div class="mr-failed"><b>This notebook failed</b> ({html.escape((r.seconds and f"{r.seconds:.1f} s") or "")}): '
                  f"<code>{html.escape((r.error or '')[:600])}</code> — the outputs below stop where it failed."
                  "</div><!--/mr-->") if r.status != "ok" else ""
        top = _nav_html(r, prev, nxt, line, position, "top") + failed + toc
        bottom = _nav_html(r, prev, nxt, line, position, "bottom")
        m = re.search(r"<body[^>]*>", body)
        at = m.end() if m else 0
        body = body[:at] + top + body[at:]
        end = body.rfind("</body>")
        body = body[:end] + bottom + body[end:] if end >= 0 else body + bottom
        head_end = body.find("</head>")
        body = body[:head_end] + _NAV_CSS + body[head_end:] if head_end >= 0 else _NAV_CSS + body
        path.write_text(body, encoding="utf-8")


# --------------------------------------------------------------------------------------------- index
_INDEX_CSS = """
body{font-family:Inter,'Helvetica Neue',Arial,sans-serif;margin:2.5rem auto;max-width:60rem;color:#222;padding:0 1rem}
h1{font-weight:600;margin-bottom:.2rem} .meta{color:#666;font-size:.9rem;margin-bottom:1.5rem}
table{border-collapse:collapse;width:100%} th,td{text-align:left;padding:.55rem .7rem;border-bottom:1px solid #e4e4e4}
th{font-weight:600;color:#555;font-size:.85rem;text-transform:uppercase;letter-spacing:.03em}
td.num{text-align:right;font-variant-numeric:tabular-nums} a{color:#2b5fa8;text-decoration:none} a:hover{text-decoration:underline}
.ok{color:#2e7d32;font-weight:600} .failed{color:#c62828;font-weight:600} .err{color:#c62828;font-size:.85rem}
code{background:#f4f4f4;padding:0 .25rem;border-radius:3px} .sec{font-size:.8rem;margin-top:.2rem;color:#666}
.banner{padding:.6rem .9rem;margin:.8rem 0;border-radius:3px} .failed-banner{background:#fdecea;color:#8e1c1c}
.ok-banner{background:#edf7ee;color:#1e5b24} details{margin:.5rem 0;font-size:.9rem} table.traces td{font-size:.85rem}
"""


def write_index(
    results: Sequence[NotebookResult],
    out_dir: Path,
    *,
    parameters: Mapping[str, Any] | None = None,
    facts: Mapping[str, Any] | None = None,
) -> Path:
    """``out_dir/index.html``: what produced the report (:func:`run_facts`), whether a notebook failed, and one
    row per notebook with links, its sections, run time and status."""
    facts = dict(facts) if facts is not None else run_facts(parameters)
    rows = []
    for r in results:
        link = (
            f'<a href="{html.escape(r.html)}">{html.escape(r.title)}</a>' if r.html else html.escape(r.title)
        )
        nb = f'<a href="{html.escape(r.ipynb)}">.ipynb</a>' if r.ipynb else ""
        err = f'<div class="err">{html.escape(r.error[:400])}</div>' if r.error else ""
        sections = ""
        if r.html and (out_dir / r.html).is_file():
            heads = [h for h in page_headings((out_dir / r.html).read_text(encoding="utf-8")) if h[0] == 2]
            if heads:
                sections = '<div class="sec">' + " · ".join(
                    f'<a href="{html.escape(r.html)}#{html.escape(hid)}">{html.escape(text)}</a>'
                    for _, hid, text in heads) + "</div>"
        rows.append(
            f'<tr class="nb"><td>{link}{sections}{err}</td><td><code>{html.escape(r.name)}</code></td><td>{nb}</td>'
            f'<td class="num">{r.seconds:.1f} s</td><td class="{r.status}">{r.status}</td></tr>'
        )
    ok = sum(r.status == "ok" for r in results)
    failed = [r for r in results if r.status != "ok"]
    when = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    params = ", ".join(
        f"<code>{html.escape(k)}={html.escape(repr(v))}</code>" for k, v in (parameters or {}).items()
    )
    banner = (
        f'<div class="banner failed-banner">{len(failed)} of {len(results)} notebooks failed: '
        + ", ".join(f'<a href="{html.escape(r.html or "")}">{html.escape(r.name)}</a>' for r in failed)
        + " — their pages show the error and the outputs up to it.</div>"
        if failed else f'<div class="banner ok-banner">All {len(results)} notebooks ran without error.</div>'
    )
    traces = facts.get("traces") or []
    trace_rows = "".join(
        f"<tr><td><code>{html.escape(str(t['trace']))}</code></td><td>{html.escape(str(t.get('model') or '?'))}</td>"
        f"<td>{html.escape(str(t.get('model_type') or ''))}</td><td>{html.escape(str(t.get('dtype') or ''))}</td>"
        f"<td>{html.escape(str(t.get('device') or ''))}</td>"
        f'<td class="num">{t["tokens"] if isinstance(t.get("tokens"), int) else ""}</td></tr>'
        for t in traces
    )
    trace_table = (
        f"<details><summary>traces read by the notebooks ({len(traces)})</summary><table class=\"traces\"><thead><tr>"
        "<th>trace</th><th>model</th><th>type</th><th>dtype</th><th>device</th><th>tokens</th></tr></thead>"
        f"<tbody>{trace_rows}</tbody></table></details>" if traces else ""
    )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>moe-routing report</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_INDEX_CSS}</style></head>
<body><h1>moe-routing report</h1>
<div class="meta produced">Produced by: {_facts_line(facts)}</div>
{trace_table}
{banner}
<div class="meta">{ok} of {len(results)} notebooks ran without error · built {html.escape(when)} ·
total {sum(r.seconds for r in results):.1f} s{" · parameters " + params if params else ""}</div>
<table><thead><tr><th>notebook</th><th>file</th><th>executed</th><th>run time</th><th>status</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


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
    from .cli import Parser

    ap = Parser(prog="python -m moe_routing.report", description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    raise SystemExit(main())
