"""Hugging Face datasets (``hf:<dataset>[:<config>][:<split>]``) through the optional ``datasets`` package."""

from __future__ import annotations

import re
from typing import Any

import pandas as pd

from ..errors import CorpusError, GatedDatasetError
from ._common import _normalise


def _require_datasets(what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise CorpusError(
            f"{what} needs the optional 'datasets' package and network access to the Hugging Face Hub: "
            "pip install 'moe-routing[datasets]' (or pip install datasets). Offline, use 'demo', 'udhr' or a "
            "local file instead."
        ) from None
    return datasets


_SPLIT_LIKE = re.compile(r"^(train|test|validation|valid|dev|devtest)(\[.*\])?$|\[")


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    parts = re.split(r":(?![^\[]*\])", spec[3:])  # a slice such as train[:100] keeps its colon
    name = parts[0]
    if not name:
        raise CorpusError(f"{spec!r}: give a dataset name, e.g. 'hf:wikitext:wikitext-2-raw-v1:test'.")
    if len(parts) > 3:
        raise CorpusError(f"{spec!r}: expected 'hf:<dataset>[:<config>][:<split>]'.")
    config, split = None, "train"
    if len(parts) == 2:
        if _SPLIT_LIKE.search(parts[1]):
            split = parts[1]
        else:
            config = parts[1] or None
    elif len(parts) == 3:
        config, split = parts[1] or None, parts[2] or "train"
    return name, config, split


def is_gated(exc: BaseException) -> bool:
    """Whether a Hub error means "gated / not authorised" rather than "unreachable" or "no such config"."""
    text = f"{type(exc).__name__} {exc}".lower()
    return "gated" in text or "401" in text or "403" in text or "unauthorized" in text


def gated_error(repo: str, exc: BaseException, *, extra: str = "") -> GatedDatasetError:
    """The error for a gated dataset the Hub refused: where to accept its terms and how to log in."""
    return GatedDatasetError(
        f"{repo} is a gated dataset and the Hub refused it ({type(exc).__name__}: {str(exc)[:200]}). Accept its "
        f"terms at https://huggingface.co/datasets/{repo} (logged in), then log in here: `hf auth login` (or "
        f"`huggingface-cli login`, or set HF_TOKEN).{extra} Offline, use 'demo' or 'udhr' instead."
    )


def _hub_error(what: str, exc: Exception) -> CorpusError:
    return CorpusError(
        f"could not load {what} from the Hugging Face Hub ({type(exc).__name__}: {exc}). Check the name, config "
        "and split, the network, and for gated datasets accept the terms on the dataset page and log in "
        "(huggingface-cli login). Offline, use 'demo', 'udhr' or a local file."
    )


def _load_hf(spec: Any, text_column: str) -> pd.DataFrame:
    """A parsed ``hf:`` Spec (``name``, ``config``, ``split``) -> the corpus layout."""
    name, config, split = spec.name, spec.config, spec.split
    datasets = _require_datasets(f"{spec.text!r}")
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        if is_gated(exc):
            raise gated_error(name, exc) from None
        raise _hub_error(f"{name!r} (config {config!r}, split {split!r})", exc) from None
    table = ds.to_pandas()
    if "lang" not in table and "language" in table:
        table = table.rename(columns={"language": "lang"})
    return _normalise(table, f"hf:{name}", text_column, f"dataset {name!r}")

