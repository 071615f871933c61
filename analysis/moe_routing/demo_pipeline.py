"""The main job: model(s) x corpus parts -> trace directories -> executed notebooks -> report/index.html.

``make demo`` runs ``run_demo("demo")``: the trained and the untrained demo model, each on the demo corpus's
train and held-out splits and on UDHR prose (held out, another domain). With a real model
(``make demo MODEL=Qwen/Qwen3-30B-A3B``) the same pipeline captures that model on FLORES-200 when the hub is
reachable, otherwise on the offline demo corpus.

Notebooks open their traces with ``open_runs(MODEL, RUNS, parts)`` (which calls ``demo_runs``), so they run on
their own too; everything is cached: a complete trace directory is never redone (``pipeline.trace_status``
decides, from the model's weight files before any model is loaded). A trace directory's name carries every option that shapes it (``langs``,
``max_per_lang``, ``max_tokens``, ``batch_size``, ``dtype``): the defaults give ``<variant>-<part>``, other values
``<variant>-<part>-<hash of the options>``, so a call with other options never returns a trace made with these.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import CorpusError

DEMO_PARTS = ("heldout", "train", "udhr")
LABELS = ["lang", "script", "source", "key", "split", "family"]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/")).strip("_") or "model"


_RUN_DEFAULTS: dict[str, Any] = {"langs": None, "max_per_lang": None, "max_tokens": None, "batch_size": 32,
                                 "dtype": "auto"}


def run_key(**options: Any) -> str:
    """``""`` for the default options, else ``"-"`` + a short hash of every option that shapes a trace."""
    opts = {**_RUN_DEFAULTS, **options}
    unknown = set(opts) - set(_RUN_DEFAULTS)
    if unknown:
        raise CorpusError(f"unknown run options {sorted(unknown)}; known: {sorted(_RUN_DEFAULTS)}.")
    if opts == _RUN_DEFAULTS:
        return ""
    opts["langs"] = None if opts["langs"] is None else list(opts["langs"])
    opts["dtype"] = str(opts["dtype"]).removeprefix("torch.")
    blob = json.dumps(opts, sort_keys=True, default=str).encode()
    return "-" + hashlib.sha256(blob).hexdigest()[:10]


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
    corpus: str | None = None,
) -> dict[str, Path]:
    """Capture every (variant, part) pair that is not on disk yet; return ``{"trained/heldout": path, ...}``.

    A real model's parts default to ``("flores",)`` when FLORES+ is reachable, else ``("heldout", "udhr")``;
    ``corpus`` ("demo", "flores", "udhr") chooses them instead. A fallback from FLORES+ is recorded in
    ``runs/<model>/corpus.json`` (``{"requested", "used", "fallback"}``) for the report.
    Each directory is keyed by the options that shape it (see the module docstring) and by the model's weight
    files: a retrained model is captured again.
    """
    from .models import load_model
    from .pipeline import capture_corpus, trace_status

    runs = Path(runs)
    variants = model_variants(model)
    if parts is None:
        parts = _parts_for(corpus, demo="trained" in variants, langs=langs, record=runs / _slug(model))
    key = run_key(langs=langs, max_per_lang=max_per_lang, max_tokens=max_tokens, batch_size=batch_size,
                  dtype=dtype)
    asked = {"batch_size": batch_size, "max_tokens": max_tokens}
    out: dict[str, Path] = {}
    for variant, name in variants.items():
        todo = {p: runs / _slug(model) / f"{variant}-{p}{key}" for p in parts}
        out.update({f"{variant}/{p}": d for p, d in todo.items()})
        status = {p: trace_status(d, name, asked) for p, d in todo.items()}  # by weight files: no model loaded
        if all(s == "complete" for s in status.values()):
            continue
        loaded, tok = load_model(name, dtype=dtype, device_map=device_map)
        for part, directory in todo.items():
            if status[part] == "complete":
                continue
            if status[part] == "stale":
                print(f"[moe-routing] {directory} was captured from other weights or settings (or by an older "
                      f"moe-routing: {'; '.join(status[part].reasons)}); capturing again", file=sys.stderr)
            frame = load_part(part, langs=langs, max_per_lang=max_per_lang)
            print(f"[moe-routing] {variant} model on {part}: {len(frame)} texts", file=sys.stderr, flush=True)
            capture_corpus(loaded, tok, frame, directory, batch_size=batch_size, max_tokens=max_tokens,
                           labels=[c for c in LABELS if c in frame.columns], progress=progress,
                           if_stale="overwrite")
        del loaded
    return out


class Runs(Mapping[str, dict[str, Any]]):
    """Opened trace directories of a model's variants: ``runs[variant][part]`` is a ``TraceReader``.

    ``variants`` lists them in order (the demo: ``trained, untrained``; a real model: ``model``), ``parts``
    the corpus parts, ``paths[variant][part]`` the directories; ``runs.main`` is the first variant's parts.
    """

    def __init__(self, model: str, readers: dict[str, dict[str, Any]], paths: dict[str, dict[str, Path]]) -> None:
        self.model = model
        self._readers = readers
        self.paths = paths
        self.variants = list(readers)
        self.parts = list(next(iter(readers.values()))) if readers else []

    def __getitem__(self, variant: str) -> dict[str, Any]:
        if variant not in self._readers:
            raise CorpusError(f"{self.model!r} has no variant {variant!r}; its variants are {self.variants}.")
        return self._readers[variant]

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    @property
    def main(self) -> dict[str, Any]:
        return self._readers[self.variants[0]]

    def __repr__(self) -> str:
        return f"Runs({self.model!r}, variants={self.variants}, parts={self.parts})"


def open_runs(model: str = "demo", runs: str | Path = "runs", parts: Sequence[str] | None = None,
              **options: Any) -> Runs:
    """Capture what is missing (``demo_runs``, same ``options``) and open every trace: ``runs[variant][part]``
    is a ``TraceReader`` (out of core: metrics stream it; ``.read()`` loads it, ``.read_documents(ids)`` reads
    some documents)."""
    from .store import TraceReader

    paths = demo_runs(model, runs, parts=None if parts is None else tuple(parts), **options)
    readers: dict[str, dict[str, Any]] = {}
    by_variant: dict[str, dict[str, Path]] = {}
    for key, path in paths.items():
        variant, part = key.split("/", 1)
        by_variant.setdefault(variant, {})[part] = path
        readers.setdefault(variant, {})[part] = TraceReader(path)
    return Runs(model, readers, by_variant)


def _parts_for(corpus: str | None, *, demo: bool, langs: list[str] | None, record: Path) -> tuple[str, ...]:
    """Corpus parts for ``corpus`` (None: the demo's three parts for the demo model, else FLORES+ or fallback)."""
    if corpus is None:
        return DEMO_PARTS if demo else _real_model_parts(langs, record)
    if corpus == "flores":
        return _real_model_parts(langs, record)
    if corpus == "demo":
        return ("heldout", "train") if demo else ("heldout", "udhr")
    return (corpus,)


def _real_model_parts(langs: list[str] | None, record: Path | None = None) -> tuple[str, ...]:
    try:
        load_part("flores", langs=langs, max_per_lang=1)
        used: tuple[str, ...] = ("flores",)
        reason = None
    except CorpusError as exc:
        reason = str(exc).splitlines()[0]
        print(f"[moe-routing] FLORES+ not reachable ({reason}); using the offline demo corpus instead.",
              file=sys.stderr)
        used = ("heldout", "udhr")
    if record is not None:  # the report reads corpus.json's "fallback" (None: FLORES+ was used)
        record.mkdir(parents=True, exist_ok=True)
        (record / "corpus.json").write_text(json.dumps({"requested": "flores", "used": list(used),
                                                        "fallback": reason}, indent=1))
    return used


def run_demo(model: str = "demo", out: str | Path = "runs", *, report: bool = True,
             report_dir: str | Path = "report", device_map: Any = None, dtype: Any = "auto",
             corpus: str | None = None, langs: list[str] | None = None) -> Path | None:
    """The whole pipeline; prints timings and returns the report's index.html (or None without a report)."""
    t0 = time.perf_counter()
    paths = demo_runs(model, out, device_map=device_map, dtype=dtype, corpus=corpus, langs=langs)
    t1 = time.perf_counter()
    print(f"[moe-routing] traces ready in {t1 - t0:.0f} s: " + ", ".join(sorted(paths)), file=sys.stderr)
    if not report:
        return None
    from .report import build_report

    index = build_report("notebooks", report_dir, parameters=demo_parameters(
        model, out, device_map=device_map, dtype=dtype, corpus=corpus, langs=langs))
    print(f"[moe-routing] notebooks executed and rendered in {time.perf_counter() - t1:.0f} s; "
          f"total {time.perf_counter() - t0:.0f} s -> {index}", file=sys.stderr)
    return index


def demo_parameters(model: str, out: str | Path, *, device_map: Any = None, dtype: Any = "auto",
                    corpus: str | None = None, langs: list[str] | None = None) -> dict[str, Any]:
    """The notebook parameters of a pipeline run: every option its captures used (``CORPUS_FALLBACK``: why
    FLORES+ was not used, or None)."""
    runs = Path(out).resolve()
    record = runs / _slug(model) / "corpus.json"
    asked_flores = corpus == "flores" or (corpus is None and "trained" not in model_variants(model))
    used = json.loads(record.read_text()) if record.is_file() and asked_flores else {}
    part = (used.get("used") or [None])[0] or ("flores" if corpus == "flores" else "udhr" if corpus == "udhr"
                                               else "heldout")
    return {"MODEL": model, "RUNS": str(runs), "CORPUS": "flores" if part == "flores" else "demo",
            "PART": part, "DTYPE": str(dtype), "DEVICE": device_map, "LANGS": langs,
            "CORPUS_FALLBACK": used.get("fallback")}
