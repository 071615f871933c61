"""Rendering: executed notebooks to HTML pages (one shared offline plotly.js), navigation and contents on every
page, and the report's index (what produced it, what failed)."""

from __future__ import annotations

import datetime as _dt
import html
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    devices = sorted({str(t["device"]) for t in traces if t.get("device")})
    device = facts.get("device") or ", ".join(devices)
    corpus = facts.get("corpus")
    if facts.get("part") and facts.get("part") != corpus:
        corpus = f"{corpus or ''} ({facts['part']})".strip()
    parts = [
        f"model <code>{html.escape(str(model))}</code>" if model else "model: the notebooks' default",
        f"corpus <code>{html.escape(str(corpus))}</code>" if corpus else "corpus: the notebooks' default",
        f"dtype <code>{html.escape(str(dtype))}</code>" if dtype else None,
        f"device <code>{html.escape(str(device))}</code>" if device else "device: not recorded",
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


