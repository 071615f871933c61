"""The main job: model(s) x corpus parts -> trace directories -> executed notebooks -> report/index.html.

``make demo`` runs ``run_demo("demo")``: the trained and the untrained demo model, each on the demo corpus's
train and held-out splits and on UDHR prose (held out, another domain). With a real model
(``make demo MODEL=Qwen/Qwen3-30B-A3B``) the same pipeline captures that model on FLORES-200 when the hub is
reachable, otherwise on the offline demo corpus.

Notebooks call ``demo_runs`` themselves, so they run on their own too; everything is cached: a complete trace
directory is never redone.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any

from .errors import CorpusError

DEMO_PARTS = ("heldout", "train", "udhr")
LABELS = ["lang", "script", "source", "key", "split"]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/")).strip("_") or "model"


def model_variants(model: str) -> dict[str, str]:
    """{variant: model name}: the demo has a trained model and its untrained initial weights."""
    if model in ("demo", "demo-trained"):
        return {"trained": "demo", "untrained": "demo-untrained"}
    return {"model": model}


def load_part(part: str, *, langs: list[str] | None = None, max_per_lang: int | None = None):
    """The corpus frame for one part name: heldout / train (demo splits), udhr, flores, or any load_corpus spec."""
    from .corpora import load_corpus

    if part in ("heldout", "train"):
        return load_corpus("demo", split=part, langs=langs, max_per_lang=max_per_lang)
    return load_corpus(part, langs=langs, max_per_lang=max_per_lang)


def demo_runs(
    model: str = "demo",
    runs: str | Path = "runs",
    *,
    parts: tuple[str, ...] | None = None,
    langs: list[str] | None = None,
    max_per_lang: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 32,
    dtype: Any = "auto",
    device_map: Any = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Capture every (variant, part) pair that is not on disk yet; return ``{"trained/heldout": path, ...}``.

    A real model's parts default to ``("flores",)`` when FLORES-200 is reachable, else ``("heldout", "udhr")``.
    """
    from .models import load_model, resolve_model_path, weights_id
    from .pipeline import capture_corpus

    runs = Path(runs)
    variants = model_variants(model)
    if parts is None:
        parts = DEMO_PARTS if "trained" in variants else _real_model_parts(langs)
    out: dict[str, Path] = {}
    for variant, name in variants.items():
        todo = {p: runs / _slug(model) / f"{variant}-{p}" for p in parts}
        out.update({f"{variant}/{p}": d for p, d in todo.items()})
        path = resolve_model_path(name)
        wid = weights_id(path) if Path(path).is_dir() else None
        if all(_complete(d, wid) for d in todo.values()):
            continue
        loaded, tok = load_model(name, dtype=dtype, device_map=device_map)
        for part, directory in todo.items():
            if _complete(directory, wid):
                continue
            stale = (directory / "manifest.json").exists() and _weights_of(directory) != wid
            if stale:
                print(f"[moe-routing] {directory} was captured from other weights; capturing again",
                      file=sys.stderr)
            corpus = load_part(part, langs=langs, max_per_lang=max_per_lang)
            print(f"[moe-routing] {variant} model on {part}: {len(corpus)} texts", file=sys.stderr, flush=True)
            capture_corpus(loaded, tok, corpus, directory, batch_size=batch_size, max_tokens=max_tokens,
                           labels=[c for c in LABELS if c in corpus.columns], progress=progress,
                           overwrite=stale)
        del loaded
    return out


def _weights_of(directory: Path) -> str | None:
    import json

    try:
        return json.loads((directory / "manifest.json").read_text()).get("weights_id")
    except (OSError, ValueError):
        return None


def _complete(directory: Path, weights: str | None = None) -> bool:
    """A finished trace directory, captured from these weights (when ``weights`` is known)."""
    import json

    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(manifest.get("complete")) and (weights is None or manifest.get("weights_id") == weights)


def _real_model_parts(langs: list[str] | None) -> tuple[str, ...]:
    try:
        load_part("flores", langs=langs, max_per_lang=1)
        return ("flores",)
    except CorpusError as exc:
        print(f"[moe-routing] FLORES-200 not reachable ({str(exc).splitlines()[0]}); using the offline demo "
              "corpus instead.", file=sys.stderr)
        return ("heldout", "udhr")


def run_demo(model: str = "demo", out: str | Path = "runs", *, report: bool = True,
             report_dir: str | Path = "report") -> Path | None:
    """The whole pipeline; prints timings and returns the report's index.html (or None without a report)."""
    t0 = time.perf_counter()
    paths = demo_runs(model, out)
    t1 = time.perf_counter()
    print(f"[moe-routing] traces ready in {t1 - t0:.0f} s: " + ", ".join(sorted(paths)), file=sys.stderr)
    if not report:
        return None
    from .report import build_report

    index = build_report("notebooks", report_dir, parameters={"MODEL": model, "RUNS": str(Path(out).resolve())})
    print(f"[moe-routing] notebooks executed and rendered in {time.perf_counter() - t1:.0f} s; "
          f"total {time.perf_counter() - t0:.0f} s -> {index}", file=sys.stderr)
    return index
