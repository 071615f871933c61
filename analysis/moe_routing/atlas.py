"""Expert atlas: a static, offline HTML site with one page per (layer, expert) of a routing trace.

``moe-routing atlas TRACE --out DIR`` / :func:`atlas` write::

    DIR/index.html      every (layer, expert): load share with its CI, strongest label with lift, top tokens;
                        search (token, label, "L3 E5") and sort by any column; rows drawn on demand
    DIR/expert.html     the expert page; ``expert.html#L3-E5`` shows layer 3, expert 5
    DIR/data/index.js   the index rows
    DIR/data/L<n>.js    one shard per layer: every expert's page data (loaded only for the layer shown)

An expert page shows: load (slots, share, bootstrap CI over documents, ratio to the balanced load), the label
values it serves with their lift and counts (cells with fewer than ``min_count`` slots marked), its top tokens
with a few concordance lines each (the token in its context, from the trace), the experts co-activated with it
(P(other | this), random-routing baseline), the experts of the next MoE layer it feeds (P(next top-1 | this
top-1), with the next layer's base share) and the ones feeding it, and — when an ablation result exists (a frame
of ``metrics.expert_importance``) — the NLL change when it is ablated. Pages are built from shards by the browser,
so 48 layers x 128 experts cost 48 small files, not 6144 pages; nothing is fetched from the network.

All numbers come from :mod:`moe_routing.metrics` (``expert_load``, ``label_usage``, ``top_tokens``,
``coactivation_matrices``, ``transitions``).
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UsageError

#: label columns with more distinct values than this are not shown by default (ids, free text; pass labels=)
MAX_LABEL_VALUES = 60
#: the index lists, per expert, the label values with at least this lift (and ``min_count`` slots)
PREFER = 1.5


def _decoder(tokens: Any) -> tuple[Callable[[int], str], Callable[[Sequence[int]], str]]:
    """(one id -> its string, a run of ids -> its text). A tokenizer decodes runs whole, so byte-fallback pieces
    merge into the characters they complete; a list / mapping / function joins the pieces."""
    if tokens is None:
        def one(i: int) -> str:
            return f"#{i}"
        return one, lambda ids: " ".join(f"#{i}" for i in ids)
    if hasattr(tokens, "decode"):
        cache: dict[int, str] = {}

        def one_tok(i: int) -> str:
            if i not in cache:
                cache[i] = tokens.decode([int(i)])
            return cache[i]
        return one_tok, lambda ids: tokens.decode([int(i) for i in ids])
    if callable(tokens):
        return (lambda i: str(tokens(int(i)))), lambda ids: "".join(str(tokens(int(i))) for i in ids)
    if isinstance(tokens, Mapping):
        return (lambda i: str(tokens.get(int(i), f"#{i}"))), lambda ids: "".join(
            str(tokens.get(int(i), f"#{i}")) for i in ids)
    seq = list(tokens)
    return (lambda i: str(seq[int(i)])), lambda ids: "".join(str(seq[int(i)]) for i in ids)


def _finite(x: Any, digits: int = 4) -> float | None:
    """JSON-safe float (None for NaN/inf)."""
    v = float(x)
    return round(v, digits) if math.isfinite(v) else None


def _load_frame(ablation: Any) -> Any:
    import pandas as pd

    if ablation is None:
        return None
    if isinstance(ablation, pd.DataFrame):
        df = ablation
    else:
        p = Path(ablation)
        if not p.is_file():
            raise UsageError(f"ablation result {p} does not exist; pass a csv/parquet/json frame of "
                             "metrics.expert_importance (columns layer, expert, delta, ci_low, ci_high).")
        df = (pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_json(p) if p.suffix == ".json"
              else pd.read_csv(p))
    missing = {"layer", "expert", "delta"} - set(df.columns)
    if missing:
        raise UsageError(f"ablation result lacks columns {sorted(missing)}; expected a frame of "
                         "metrics.expert_importance (layer, expert, delta, ci_low, ci_high).")
    return df


def _concordance(trace: Any, li: int, wanted: dict[int, list[int]], n_lines: int, width: int,
                 decode_run: Callable[[Sequence[int]], str]) -> dict[tuple[int, int], list[list[str]]]:
    """For (expert, token_id) pairs of layer position ``li``: up to ``n_lines`` occurrences (spread over the
    trace) as [left, token, right] text, the window cut at document boundaries."""
    ids = trace.expert_ids[:, li, :]
    e = trace.num_experts
    tok = trace.token_ids.astype(np.int64)
    pos, slot = np.nonzero(ids >= 0)
    keys = tok[pos] * e + ids[pos, slot].astype(np.int64)
    order = np.argsort(keys, kind="stable")
    skeys, spos = keys[order], pos[order]
    docs = trace.doc_ids
    n = len(tok)
    # first and one-past-last token index of each token's document (docs are contiguous runs in a trace)
    change = np.r_[True, docs[1:] != docs[:-1]] if n else np.zeros(0, bool)
    run_start = np.maximum.accumulate(np.where(change, np.arange(n), 0)) if n else np.zeros(0, np.int64)
    ends = np.r_[np.flatnonzero(change)[1:], n] if n else np.zeros(0, np.int64)
    run_end = ends[np.cumsum(change) - 1] if n else np.zeros(0, np.int64)
    pairs = [(int(x), int(t)) for x, ts in wanted.items() for t in ts]
    if not pairs:
        return {}
    want = np.array([t * e + x for x, t in pairs], dtype=np.int64)
    los = np.searchsorted(skeys, want, side="left").tolist()
    his = np.searchsorted(skeys, want, side="right").tolist()
    tok_list = tok.tolist()
    out: dict[tuple[int, int], list[list[str]]] = {}
    for (x, t), lo, hi in zip(pairs, los, his, strict=True):
        m = min(n_lines, hi - lo)
        if m <= 0:
            continue
        take = sorted({lo + ((hi - 1 - lo) * i) // max(m - 1, 1) for i in range(m)})
        lines = []
        for p in spos[take].tolist():
            a = max(p - width, int(run_start[p]))
            b = min(p + 1 + width, int(run_end[p]))
            lines.append([decode_run(tok_list[a:p]), decode_run(tok_list[p:p + 1]), decode_run(tok_list[p + 1:b])])
        out[(x, t)] = lines
    return out


def build_atlas_data(
    trace: Any,
    *,
    tokens: Any = None,
    labels: Sequence[str] | None = None,
    ablation: Any = None,
    top_n: int = 8,
    n_lines: int = 3,
    context: int = 6,
    n_coactive: int = 5,
    n_boot: int = 200,
    ci: float = 0.95,
    min_count: int = 20,
    seed: int = 0,
) -> tuple[list[list[Any]], dict[int, dict[str, Any]], dict[str, Any]]:
    """The atlas's data: (index rows, {layer: shard}, site facts). See :func:`atlas` for the arguments."""
    import pandas as pd

    from . import metrics as M
    from .metrics._common import grouped_counts_boot, quantiles
    from .trace import RoutingTrace

    tr = trace if isinstance(trace, RoutingTrace) else M.read_all(trace)
    one, decode_run = _decoder(tokens)
    e = tr.num_experts
    layers = list(tr.layers)

    load = M.expert_load(tr)
    _, _, boot, _, _ = grouped_counts_boot(tr, None, n_boot=n_boot, seed=seed)
    share_boot = boot[0] / np.maximum(boot[0].sum(axis=2, keepdims=True), 1e-12)  # [B, layers, E]
    share_lo, share_hi = quantiles(share_boot, ci)

    if labels is not None:
        unknown = [x for x in labels if x not in tr.labels]
        if unknown:
            raise UsageError(f"labels {unknown} are not in the trace; it has {sorted(tr.labels)}.")
    label_names = list(labels) if labels is not None else [  # default: labels that split the tokens in a few ways
        x for x in sorted(tr.labels) if 2 <= len(np.unique(tr.labels[x].astype(str))) <= MAX_LABEL_VALUES]
    usage = {name: M.label_usage(tr, name) for name in label_names}

    top = M.top_tokens(tr, n=top_n, tokens=one)
    coact = M.coactivation_matrices(tr)
    co_random = float(np.asarray(coact.attrs.get("random", np.nan)).ravel()[0])
    flows = M.transitions(tr) if len(layers) > 1 else None
    effect = _load_frame(ablation)

    index: list[list[Any]] = []
    shards: dict[int, dict[str, Any]] = {}
    # everything per (layer, expert) grouped once, so a page costs dictionary look-ups (48 x 128 stays fast)
    n_l = len(layers)
    cnt = load["count"].to_numpy().reshape(n_l, e)
    shr = load["share"].to_numpy().reshape(n_l, e)
    ratio = load["load_ratio"].to_numpy().reshape(n_l, e)
    co_all = np.asarray(coact.values, dtype=np.float64)  # [layers, E, E]
    flow_all = np.asarray(flows.values, dtype=np.float64) if flows is not None else None  # [layers - 1, E, E]
    flow_n = np.asarray(M.transitions(tr, normalize=False).values, dtype=np.float64) if flows is not None else None
    lab_rows: dict[str, dict[tuple[int, int], list[list[Any]]]] = {}
    for name, df in usage.items():
        d = df.sort_values("lift", ascending=False, kind="stable")
        groups: dict[tuple[int, int], list[list[Any]]] = {}
        for v, lay, x, c, sh_, lf, t in zip(d[name], d["layer"], d["expert"], d["count"], d["share"], d["lift"],
                                           d["tokens"], strict=True):
            groups.setdefault((int(lay), int(x)), []).append([str(v), int(c), _finite(sh_), _finite(lf, 3), int(t)])
        lab_rows[name] = groups
    tok_rows: dict[tuple[int, int], list[Any]] = {}
    for r in top.itertuples():
        tok_rows.setdefault((int(r.layer), int(r.expert)), []).append(r)
    eff_rows: dict[tuple[int, int], list[list[Any]]] = {}
    if effect is not None:
        group = next((c for c in effect.columns if c not in {
            "layer", "expert", "delta", "ci_low", "ci_high", "abs_delta", "nll_clean", "tokens", "docs"}), None)
        for _, r in effect.iterrows():
            eff_rows.setdefault((int(r["layer"]), int(r["expert"])), []).append([
                str(r[group]) if group else "all", _finite(r["delta"]), _finite(r.get("ci_low", np.nan)),
                _finite(r.get("ci_high", np.nan)),
                int(r["tokens"]) if "tokens" in r and pd.notna(r["tokens"]) else None])

    def ranked(values: np.ndarray, skip: int | None = None) -> list[int]:
        v = np.nan_to_num(values, nan=-1.0)
        return [int(j) for j in np.argsort(-v, kind="stable") if j != skip and v[j] > 0][:n_coactive]

    for li, layer in enumerate(layers):
        wanted = {x: [int(r.token_id) for r in tok_rows.get((layer, x), [])] for x in range(e)}
        lines = _concordance(tr, li, wanted, n_lines, context, decode_run)
        next_layer = layers[li + 1] if li + 1 < n_l else None
        prev_layer = layers[li - 1] if li > 0 else None
        # tokens reaching each expert here from each expert of the previous layer: P(here | prev) * prev top-1s
        fed = flow_n[li - 1] if flow_n is not None and prev_layer is not None else None  # [prev E, E] counts
        next_base = None  # the next layer's top-1 shares: what P(next | this) is under layer-independent routing
        if flow_n is not None and next_layer is not None:
            col_tot = flow_n[li].sum(axis=0)
            next_base = col_tot / max(col_tot.sum(), 1.0)
        experts: list[dict[str, Any]] = []
        for x in range(e):
            page: dict[str, Any] = {
                "count": int(cnt[li, x]), "share": _finite(shr[li, x]),
                "share_low": _finite(share_lo[li, x]), "share_high": _finite(share_hi[li, x]),
                "load_ratio": _finite(ratio[li, x], 3), "dead": bool(cnt[li, x] == 0),
            }
            lab = {name: groups.get((layer, x), []) for name, groups in lab_rows.items()}
            best: tuple[str, Any, float] | None = None
            prefs: list[tuple[float, str]] = []  # label values it prefers (lift >= PREFER, enough slots)
            for name, rows in lab.items():
                for v, c, _s, lf, _t in rows:
                    if c >= min_count and lf is not None and (best is None or lf > best[2]):
                        best = (name, v, lf)
                    if c >= min_count and lf is not None and lf >= PREFER:
                        prefs.append((lf, f"{name}={v}"))
            page["labels"] = lab
            page["tokens"] = [
                {"id": int(r.token_id), "text": str(r.token), "count": int(r.count),
                 "expert_share": _finite(r.expert_share), "token_share": _finite(r.token_share),
                 "lift": _finite(r.lift, 3), "lines": lines.get((x, int(r.token_id)), [])}
                for r in tok_rows.get((layer, x), [])
            ]
            co = co_all[li, x]
            page["coactive"] = [[j, _finite(co[j])] for j in ranked(co, skip=x)]
            if flow_all is not None and next_base is not None:
                f = flow_all[li, x]
                page["feeds"] = [[j, _finite(f[j]), _finite(next_base[j])] for j in ranked(f)]
            if fed is not None:
                col = fed[:, x]
                tot = col.sum()
                page["fed_by"] = [[j, _finite(col[j] / tot if tot else np.nan)] for j in ranked(col)]
            if effect is not None:
                page["effect"] = eff_rows.get((layer, x), [])
            experts.append(page)
            index.append([layer, x, page["count"], page["share"], page["share_low"], page["share_high"],
                          page["load_ratio"], best[0] + "=" + best[1] if best else "", best[2] if best else None,
                          " ".join(tk["text"] for tk in page["tokens"][:5]),
                          " ".join(f"{t} ({lf:.1f})" for lf, t in sorted(prefs, reverse=True)[:6])])
        shards[layer] = {"layer": layer, "prev": prev_layer, "next": next_layer, "experts": experts}
    facts = {
        "model": tr.model_name or "?", "tokens": int(tr.num_tokens), "docs": len(np.unique(tr.doc_ids)),
        "layers": layers, "num_experts": e, "top_k": int(tr.top_k), "labels": label_names,
        "ci": ci, "n_boot": n_boot, "min_count": min_count, "coactive_random": _finite(co_random),
        "uniform_share": _finite(1 / e), "has_effect": effect is not None, "prefer": PREFER,
    }
    return index, shards, facts


def atlas(
    trace: Any,
    out: str | Path = "atlas",
    *,
    tokens: Any = None,
    labels: Sequence[str] | None = None,
    ablation: Any = None,
    top_n: int = 8,
    n_lines: int = 3,
    context: int = 6,
    n_boot: int = 200,
    ci: float = 0.95,
    min_count: int = 20,
    seed: int = 0,
) -> Path:
    """Write the expert atlas of ``trace`` (RoutingTrace, trace directory or reader) into ``out``; the index path.

    ``tokens``: a tokenizer (or vocabulary list / mapping / function) to show token strings; ``labels``: label
    columns to show (default: every label with 2 to ``MAX_LABEL_VALUES`` values); ``ablation``: a frame
    or csv/parquet/json file of :func:`moe_routing.metrics.expert_importance` (default: an
    ``expert_importance.{parquet,csv}`` inside the trace directory, if any); ``top_n`` tokens per expert with
    ``n_lines`` concordance lines of ``context`` tokens each side; ``n_boot`` document-bootstrap replicates
    for the load's ``ci`` interval; label cells with fewer than ``min_count`` slots are marked.
    """
    if ablation is None and isinstance(trace, (str, Path)):
        for name in ("expert_importance.parquet", "expert_importance.csv"):
            if (Path(trace) / name).is_file():
                ablation = Path(trace) / name
                break
    index, shards, facts = build_atlas_data(trace, tokens=tokens, labels=labels, ablation=ablation, top_n=top_n,
                                            n_lines=n_lines, context=context, n_boot=n_boot, ci=ci,
                                            min_count=min_count, seed=seed)
    root = Path(out)
    (root / "data").mkdir(parents=True, exist_ok=True)
    facts["built"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cols = ["layer", "expert", "count", "share", "share_low", "share_high", "load_ratio", "label", "lift", "tokens",
            "prefers"]
    _write_js(root / "data" / "index.js", "ATLAS_INDEX", {"facts": facts, "columns": cols, "rows": index})
    for layer, shard in shards.items():
        _write_js(root / "data" / f"L{layer}.js", "ATLAS_SHARD", shard)
    title = html.escape(f"Expert atlas · {facts['model']}")
    (root / "atlas.css").write_text(_CSS, encoding="utf-8")
    (root / "index.html").write_text(_INDEX_HTML.replace("__TITLE__", title), encoding="utf-8")
    (root / "expert.html").write_text(_EXPERT_HTML.replace("__TITLE__", title), encoding="utf-8")
    return root / "index.html"


def _write_js(path: Path, fn: str, payload: Any) -> None:
    """``fn(payload);`` — a script, so pages opened from disk (file://) can load it without fetch()."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    path.write_text(f"{fn}({text});\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------- cli
def add_arguments(ap: Any) -> None:
    """Options of ``moe-routing atlas``."""
    ap.add_argument("trace", help="trace directory")
    ap.add_argument("--out", default="atlas", help="output folder (default: ./atlas)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer (HF id, path or 'demo') for token strings (default: the trace's model, if local)")
    ap.add_argument("--label", action="append", default=None, metavar="NAME", help="label to show (repeatable)")
    ap.add_argument("--ablation", default=None, help="expert_importance result (csv/parquet/json)")
    ap.add_argument("--top", type=int, default=8, help="top tokens per expert (default 8)")
    ap.add_argument("--boot", type=int, default=200, help="bootstrap replicates for the load CI (default 200)")
    ap.set_defaults(func=run)


def _tokenizer_for(trace_dir: str, name: str | None) -> Any:
    """The tokenizer named, else the trace's model's (when it resolves locally), else None (ids are shown)."""
    import moe_routing as mr

    loader = getattr(mr, "load_tokenizer", None)
    if name is None and loader is not None:
        try:
            return loader(trace_dir)
        except Exception:
            return None
    if name is None:
        from .store import TraceReader

        name = TraceReader(trace_dir).model_name or None
    if not name:
        return None
    from transformers import AutoTokenizer

    from .models import resolve_model_path

    try:
        return AutoTokenizer.from_pretrained(resolve_model_path(name), local_files_only=True)
    except Exception:
        return None


def run(args: Any) -> int:
    """``moe-routing atlas TRACE --out DIR``: build the atlas, print where it is and how long it took."""
    start = time.perf_counter()
    tok = _tokenizer_for(args.trace, args.tokenizer)
    index = atlas(args.trace, args.out, tokens=tok, labels=args.label, ablation=args.ablation, top_n=args.top,
                  n_boot=args.boot)
    files = list(index.parent.rglob("*"))
    size = sum(f.stat().st_size for f in files if f.is_file())
    print(f"atlas: {index} ({len(files)} files, {size / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s"
          f"{'' if tok is not None else '; no tokenizer: token ids shown'})")
    return 0


# ------------------------------------------------------------------------------------------------- pages
_CSS = """
body{font-family:Inter,'Helvetica Neue',Arial,sans-serif;margin:1.5rem auto;max-width:68rem;color:#222;padding:0 1rem}
h1{font-weight:600;margin:.2rem 0} h2{font-size:1.05rem;margin:1.4rem 0 .4rem;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.88rem} nav a{margin-right:1rem} a{color:#2b5fa8;text-decoration:none}
a:hover{text-decoration:underline} table{border-collapse:collapse;width:100%;font-size:.88rem}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #eee} th{cursor:pointer;color:#555;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums} .few{color:#999;font-style:italic}
input#q{width:100%;max-width:30rem;padding:.4rem;font-size:1rem;margin:.6rem 0}
.conc{font-family:ui-monospace,Menlo,monospace;font-size:.8rem;color:#555;white-space:pre-wrap}
.conc b{background:#ffe9a8;color:#000} .bar{display:inline-block;height:.7rem;background:#4c78a8;vertical-align:middle}
.ws{color:#b0b0b0} .note{color:#666;font-size:.85rem;margin:.3rem 0} td.pref{font-size:.8rem;color:#444}
"""

_INDEX_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="stylesheet" href="atlas.css">
</head>
<body><h1>__TITLE__</h1><div class="meta" id="facts"></div>
<input id="q" type="search" placeholder="search: a token, a label (lang=de), L3, E5, L3 E5" autofocus>
<div class="note" id="count"></div>
<table><thead><tr id="head"></tr></thead><tbody id="rows"></tbody></table>
<script>
var D = null, sortKey = "share", sortDesc = true, LIMIT = 300;
function ATLAS_INDEX(d) { D = d; }
</script>
<script src="data/index.js"></script>
<script>
var C = D.columns, F = D.facts;
var SHOW = [["layer","layer"],["expert","expert"],["count","slots"],["share","load share"],["ci","CI"],
            ["load_ratio","× balanced"],["label","strongest label"],["lift","lift"],["prefers","prefers (lift ≥ " + F.prefer + ")"],
            ["tokens","top tokens"]];
function col(r, k) { return r[C.indexOf(k)]; }
function fmt(v, d) { return v === null || v === undefined ? "–" : (+v).toFixed(d); }
function esc(s) { return String(s).replace(/[&<>"]/g, function (c) {
  return {"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]; }); }
document.getElementById("facts").innerHTML = esc(F.model) + " · " + F.tokens + " tokens in " + F.docs +
  " documents · " + F.layers.length + " MoE layers × " + F.num_experts + " experts, top-" + F.top_k +
  " · load CI: " + Math.round(F.ci * 100) + "% document bootstrap (" + F.n_boot + ") · balanced share " +
  fmt(F.uniform_share, 4) + " · built " + esc(F.built);
function matches(r, q) {
  if (!q) return true;
  return q.toLowerCase().split(/\\s+/).every(function (w) {
    var m = /^l(\\d+)$/.exec(w); if (m) return col(r, "layer") == +m[1];
    m = /^e(\\d+)$/.exec(w); if (m) return col(r, "expert") == +m[1];
    return (col(r, "label") + " " + col(r, "prefers") + " " + col(r, "tokens")).toLowerCase().indexOf(w) >= 0;
  });
}
function draw() {
  var q = document.getElementById("q").value.trim();
  var rows = D.rows.filter(function (r) { return matches(r, q); });
  var k = sortKey === "ci" ? "share_high" : sortKey;
  rows.sort(function (a, b) { var x = col(a, k), y = col(b, k);
    if (x === y) return 0; if (x === null) return 1; if (y === null) return -1;
    return (x < y ? -1 : 1) * (sortDesc ? -1 : 1); });
  document.getElementById("count").textContent = rows.length + " of " + D.rows.length + " experts" +
    (rows.length > LIMIT ? " (first " + LIMIT + " shown; narrow the search)" : "");
  document.getElementById("head").innerHTML = SHOW.map(function (s) {
    return '<th data-k="' + s[0] + '">' + s[1] + (s[0] === sortKey ? (sortDesc ? " ▼" : " ▲") : "") + "</th>"; }).join("");
  document.getElementById("rows").innerHTML = rows.slice(0, LIMIT).map(function (r) {
    var href = "expert.html#L" + col(r, "layer") + "-E" + col(r, "expert");
    return '<tr class="row"><td class="num">' + col(r, "layer") + '</td><td class="num"><a href="' + href + '">' +
      col(r, "expert") + '</a></td><td class="num">' + col(r, "count") + '</td><td class="num">' +
      fmt(col(r, "share"), 4) + '</td><td class="num">' + fmt(col(r, "share_low"), 4) + "–" +
      fmt(col(r, "share_high"), 4) + '</td><td class="num">' + fmt(col(r, "load_ratio"), 2) + "</td><td>" +
      esc(col(r, "label")) + '</td><td class="num">' + fmt(col(r, "lift"), 2) + '</td><td class="pref">' +
      esc(col(r, "prefers")) + "</td><td>" + esc(col(r, "tokens")) +
      "</td></tr>"; }).join("");
}
document.getElementById("head").addEventListener("click", function (ev) {
  var k = ev.target.getAttribute("data-k"); if (!k) return;
  if (k === sortKey) sortDesc = !sortDesc; else { sortKey = k; sortDesc = k !== "layer" && k !== "expert"; }
  draw(); });
document.getElementById("q").addEventListener("input", draw);
(function () {  // index.html#q=...&sort=lift : a shareable search
  var h = new URLSearchParams(location.hash.slice(1));
  if (h.get("q")) document.getElementById("q").value = h.get("q");
  if (h.get("sort")) { sortKey = h.get("sort"); sortDesc = h.get("asc") === null; }
})();
draw();
</script></body></html>
"""

_EXPERT_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><link rel="stylesheet" href="atlas.css">
</head><body>
<nav><a href="index.html" id="up">↑ index</a><a id="prev">← previous expert</a><a id="next">next expert →</a></nav>
<h1 id="title">Expert</h1><div class="meta" id="facts"></div><main id="page"></main>
<script>
var D = null, SHARDS = {};
function ATLAS_INDEX(d) { D = d; }
function ATLAS_SHARD(s) { SHARDS[s.layer] = s; }
</script>
<script src="data/index.js"></script>
<script>
var F = D.facts;
function fmt(v, d) { return v === null || v === undefined ? "–" : (+v).toFixed(d); }
function esc(s) { return String(s).replace(/[&<>"]/g, function (c) {
  return {"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]; }); }
function vis(s) { return esc(s).replace(/ /g, '<span class="ws">·</span>').replace(/\\n/g, '<span class="ws">↵</span>'); }
function nl(s) { return esc(s).replace(/\\n/g, '<span class="ws">↵</span>'); }
function link(l, e) { return '<a class="xl" href="expert.html#L' + l + "-E" + e + '">L' + l + " E" + e + "</a>"; }
function bar(v, m) { return '<span class="bar" style="width:' + Math.max(1, Math.round(80 * (v || 0) / (m || 1))) + 'px"></span> '; }
function table(head, rows) { return "<table><thead><tr>" + head.map(function (h) { return "<th>" + h + "</th>"; }).join("") +
  "</tr></thead><tbody>" + rows.join("") + "</tbody></table>"; }
function parse() { var m = /^#L(\\d+)-E(\\d+)$/.exec(location.hash); return m ? [+m[1], +m[2]] : [F.layers[0], 0]; }
function show() {
  var le = parse(), L = le[0], E = le[1];
  if (F.layers.indexOf(L) < 0 || E < 0 || E >= F.num_experts) {
    document.getElementById("page").innerHTML = "<p>No expert L" + L + " E" + E + " in this atlas.</p>"; return; }
  if (!SHARDS[L]) { var s = document.createElement("script"); s.src = "data/L" + L + ".js"; s.onload = show;
    document.head.appendChild(s); return; }
  var sh = SHARDS[L], x = sh.experts[E], li = F.layers.indexOf(L), out = [];
  var flat = li * F.num_experts + E, n = F.layers.length * F.num_experts;
  function at(i) { return [F.layers[Math.floor(i / F.num_experts)], i % F.num_experts]; }
  var p = at((flat - 1 + n) % n), q = at((flat + 1) % n);
  document.getElementById("prev").href = "expert.html#L" + p[0] + "-E" + p[1];
  document.getElementById("next").href = "expert.html#L" + q[0] + "-E" + q[1];
  document.title = "L" + L + " E" + E + " · " + F.model;
  document.getElementById("title").textContent = "Layer " + L + ", expert " + E;
  document.getElementById("facts").textContent = F.model + " · " + F.tokens + " tokens · top-" + F.top_k;
  out.push("<h2>Load</h2><p>" + x.count + " routing slots" + (x.dead ? " (never chosen)" : "") + " · share " +
    fmt(x.share, 4) + " (" + Math.round(F.ci * 100) + "% CI " + fmt(x.share_low, 4) + "–" + fmt(x.share_high, 4) +
    ", document bootstrap) · " + fmt(x.load_ratio, 2) + "× the balanced share " + fmt(F.uniform_share, 4) + "</p>");
  Object.keys(x.labels).forEach(function (name) {
    var rows = x.labels[name], m = Math.max.apply(null, rows.map(function (r) { return r[3] || 0; }).concat([1]));
    out.push("<h2>" + esc(name) + "</h2><p class='note'>lift = the expert's share of the value's slots / its share " +
      "of all slots (1 = no preference); grey rows have fewer than " + F.min_count + " slots.</p>" +
      table([esc(name), "slots", "share of the value's slots", "lift", "tokens of the value"], rows.map(function (r) {
        return "<tr" + (r[1] < F.min_count ? ' class="few"' : "") + "><td>" + esc(r[0]) + '</td><td class="num">' + r[1] +
          '</td><td class="num">' + fmt(r[2], 4) + '</td><td class="num">' + bar(r[3], m) + fmt(r[3], 2) +
          '</td><td class="num">' + r[4] + "</td></tr>"; })));
  });
  out.push("<h2>Top tokens</h2>" + (x.tokens.length ? table(["token", "slots", "share of the expert", "share of the token",
    "lift", "in context"], x.tokens.map(function (t) {
      return '<tr class="tok"><td><code>' + vis(t.text) + '</code></td><td class="num">' + t.count + '</td><td class="num">' +
        fmt(t.expert_share, 3) + '</td><td class="num">' + fmt(t.token_share, 3) + '</td><td class="num">' + fmt(t.lift, 2) +
        '</td><td class="conc">' + t.lines.map(function (c) { return nl(c[0]) + "<b>" + vis(c[1]) + "</b>" + nl(c[2]); })
        .join("<br>") + "</td></tr>"; })) : "<p>No tokens.</p>"));
  out.push("<h2>Co-activated experts (same token, layer " + L + ")</h2><p class='note'>P(other | this); uniformly random " +
    "routing gives " + fmt(F.coactive_random, 3) + ".</p>" + (x.coactive.length ? table(["expert", "P(other | this)"],
    x.coactive.map(function (c) { return "<tr><td>" + link(L, c[0]) + '</td><td class="num">' + fmt(c[1], 3) + "</td></tr>"; }))
    : "<p>None (top-1 routing or never chosen).</p>"));
  if (x.feeds && !x.feeds.length) out.push("<h2>Feeds, layer " + sh.next + "</h2><p>Never the first choice of a token " +
    "in this layer, so it passes no first choices on.</p>");
  if (x.fed_by && !x.fed_by.length) out.push("<h2>Fed by, layer " + sh.prev + "</h2><p>Never the first choice of a " +
    "token in this layer.</p>");
  if (x.feeds && x.feeds.length) out.push("<h2>Feeds, layer " + sh.next + "</h2><p class='note'>P(next top-1 | this top-1) beside the next " +
    "expert's share of all top-1 choices (what layer-independent routing gives).</p>" + table(["next expert",
    "P(next | this)", "base share"], x.feeds.map(function (c) { return "<tr><td>" + link(sh.next, c[0]) +
      '</td><td class="num">' + fmt(c[1], 3) + '</td><td class="num">' + fmt(c[2], 3) + "</td></tr>"; })));
  if (x.fed_by && x.fed_by.length) out.push("<h2>Fed by, layer " + sh.prev + "</h2>" + table(["previous expert", "share of this expert's tokens"],
    x.fed_by.map(function (c) { return "<tr><td>" + link(sh.prev, c[0]) + '</td><td class="num">' + fmt(c[1], 3) +
      "</td></tr>"; })));
  if (x.effect) out.push("<h2>Causal effect of ablating it</h2><p class='note'>mean NLL change per token when the expert " +
    "is ablated (interval from the ablation run).</p>" + table(["group", "Δ NLL", "low", "high", "tokens"], x.effect.map(
      function (r) { return "<tr><td>" + esc(r[0]) + '</td><td class="num">' + fmt(r[1], 4) + '</td><td class="num">' +
        fmt(r[2], 4) + '</td><td class="num">' + fmt(r[3], 4) + '</td><td class="num">' + (r[4] === null ? "–" : r[4]) +
        "</td></tr>"; })));
  else if (!F.has_effect) out.push("<p class='note'>No ablation result in this atlas (pass one of " +
    "<code>metrics.expert_importance</code> with --ablation).</p>");
  document.getElementById("page").innerHTML = out.join("");
  window.scrollTo(0, 0);
}
window.addEventListener("hashchange", show);
show();
</script></body></html>
"""
