"""Notebook prose states no memorised numbers: every decimal or percentage in a markdown cell is either shown by
that notebook's own outputs (a code cell printed it from the data) or is a constant listed in ``CONSTANTS`` with
the reason it is one (a definition, a baseline such as 1/E, a published value).

- ``test_markdown_numbers_are_constants_or_code`` needs no execution: a markdown number that is not a listed
  constant must at least appear literally in the notebook's code (a parameter the prose names).
- ``test_markdown_numbers_are_shown`` executes each notebook on its defaults (the same executed notebooks as
  ``test_notebooks.py``: each runs once per session) and looks every markdown number up in its outputs.
- ``test_claims_hold_on_a_second_model`` does the same with ``MODEL`` set to a second, differently trained model
  (the demo recipe with another seed and far fewer steps, trained here): the notebooks run to the end, their
  prose numbers are still backed by the outputs, and the claims they print are computed for that model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from test_notebooks import NOTEBOOKS, TIMEOUT, execute_notebook, kernel, require_ok, runs_dir  # noqa: F401

NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+|\d+\s?%)")  # the same pattern as the project's prose-number hook

# The whole whitelist: (notebook stem, number as written) -> why it is a constant, not a measurement.
CONSTANTS: dict[tuple[str, str], str] = {
    ("04_per_language_routing", "95%"): "the confidence level of the bootstrap intervals drawn (the metric default)",
    ("05_teaching_moe", "0.01"): "Switch Transformer's published aux-loss coefficient",
    ("05_teaching_moe", "0.001"): "Qwen3's published aux-loss coefficient",
    ("06_compare_conditions", "95%"): "the confidence level of the bootstrap intervals drawn (the metric default)",
}

SECOND_MODEL_NOTEBOOKS = [p for p in NOTEBOOKS if p.stem[:2] in ("01", "02", "03", "04", "06")]


def markdown_numbers(cells: list[dict]) -> list[tuple[int, str, str]]:
    """(cell index, number, line) for every decimal or percentage in the markdown cells."""
    hits = []
    for i, cell in enumerate(cells):
        if cell.get("cell_type") != "markdown":
            continue
        for line in _text(cell.get("source", "")).splitlines():
            hits += [(i, re.sub(r"\s", "", m.group(1)), line.strip()) for m in NUMBER.finditer(line)]
    return hits


def output_text(cells: list[dict]) -> str:
    """Everything the code cells showed as text: streams, plain text, markdown and HTML (not figure data)."""
    parts = []
    for cell in cells:
        for out in cell.get("outputs", []):
            parts.append(_text(out.get("text", "")))
            data = out.get("data", {})
            parts += [_text(data.get(mime, "")) for mime in ("text/plain", "text/markdown", "text/html")]
    return "\n".join(parts)


def shown(number: str, text: str) -> bool:
    """``number`` appears in ``text`` as a whole number (0.25 does not match 0.251 or 10.25)."""
    body = re.escape(number[:-1]) + r"\s?%" if number.endswith("%") else re.escape(number)
    return re.search(rf"(?<![\d.]){body}(?![\d])", text) is not None


def unbacked(stem: str, cells: list[dict]) -> list[str]:
    text = output_text(cells)
    return [f"cell {i}: {n!r} in: {line}" for i, n, line in markdown_numbers(cells)
            if (stem, n) not in CONSTANTS and not shown(n, text)]


def _text(value: str | list[str]) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _cells(source: Path) -> list[dict]:
    import jupytext

    return [dict(c) for c in jupytext.read(source).cells]


# ----------------------------------------------------------------------------------------------- static
def test_scanner_finds_numbers_and_lookup_is_exact() -> None:
    """The scan and the lookup themselves: a stale number is caught, a shown one passes, partial matches don't."""
    cells = [{"cell_type": "markdown", "source": "NMI peaks at 0.35 (42% of tokens), layer 2 of 4."},
             {"cell_type": "code", "source": "", "outputs": [{"text": "nmi 0.351, share 42 %\n"}]}]
    assert [n for _, n, _ in markdown_numbers(cells)] == ["0.35", "42%"]
    assert unbacked("x", cells) == [f"cell 0: '0.35' in: {cells[0]['source']}"]  # 0.351 is not 0.35
    cells[1]["outputs"].append({"data": {"text/markdown": "peak 0.35"}})
    assert unbacked("x", cells) == []


@pytest.mark.parametrize("source", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_markdown_numbers_are_constants_or_code(source: Path) -> None:
    """Without executing: a markdown number is a listed constant or written in the notebook's own code."""
    cells = _cells(source)
    code = "\n".join(_text(c["source"]) for c in cells if c["cell_type"] == "code")
    stale = [f"{n!r} in: {line}" for _, n, line in markdown_numbers(cells)
             if (source.stem, n) not in CONSTANTS and not shown(n, code)]
    assert not stale, (f"{source.name}: numbers in markdown that no code computes (print them from the data with "
                       "a code cell, or list a true constant in CONSTANTS):\n" + "\n".join(stale))


def test_constants_are_used() -> None:
    """Every whitelisted constant still occurs in its notebook's markdown (the whitelist stays minimal)."""
    used = {(p.stem, n) for p in NOTEBOOKS for _, n, _ in markdown_numbers(_cells(p))}
    assert not set(CONSTANTS) - used, f"unused CONSTANTS entries: {sorted(set(CONSTANTS) - used)}"


# --------------------------------------------------------------------------------------------- executed
def _executed_cells(source: Path, kernel: str, parameters: dict[str, str]) -> list[dict]:  # noqa: F811
    run = execute_notebook(source, kernel, parameters)
    require_ok(run, source)
    return json.loads(run.ipynb.read_text(encoding="utf-8"))["cells"]


@pytest.mark.notebooks
@pytest.mark.timeout(TIMEOUT + 120, func_only=True)
@pytest.mark.parametrize("source", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_markdown_numbers_are_shown(source: Path, runs_dir: Path, kernel: str) -> None:  # noqa: F811
    """On the demo defaults, every markdown number is in the notebook's outputs or a listed constant."""
    missing = unbacked(source.stem, _executed_cells(source, kernel, {"RUNS": str(runs_dir)}))
    assert not missing, f"{source.name}: markdown numbers its outputs do not show:\n" + "\n".join(missing)


@pytest.fixture(scope="session")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo recipe with another seed and a tenth of the steps: another tokenizer, other weights."""
    from moe_routing.demo import train_demo_model

    out = tmp_path_factory.mktemp("second-model")
    facts = train_demo_model(out, steps=60, seed=1, threads=1, progress=False)
    assert facts["steps"] > 0 and (out / "trained" / "model.safetensors").exists(), facts
    return out / "trained"


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.timeout(TIMEOUT + 300, func_only=True)
@pytest.mark.parametrize("source", SECOND_MODEL_NOTEBOOKS, ids=[p.stem for p in SECOND_MODEL_NOTEBOOKS])
def test_claims_hold_on_a_second_model(source: Path, second_model: Path, kernel: str,  # noqa: F811
                                       tmp_path_factory: pytest.TempPathFactory) -> None:
    """MODEL = a differently trained model: the notebook runs, and its markdown numbers are still backed."""
    runs = tmp_path_factory.getbasetemp() / "second-model-runs"
    cells = _executed_cells(source, kernel, {"MODEL": str(second_model), "RUNS": str(runs)})
    missing = unbacked(source.stem, cells)
    assert not missing, f"{source.name} on {second_model}: markdown numbers not shown:\n" + "\n".join(missing)
    computed = [_text(out.get("data", {}).get("text/markdown", "")) for cell in cells for out in cell.get("outputs", [])]
    lies = [text for text in computed if "untrained" in text]
    assert not lies, f"{source.name}: sentences about an untrained twin that this model does not have: {lies}"
    checks = re.findall(r"^(holds|does not hold for [^:]*): (.*)$", output_text(cells), flags=re.M)
    if source.stem[:2] in ("02", "03", "04", "06"):  # notebooks with a check cell of headline claims
        assert checks, f"{source.name}: the check cell reported no claim for {second_model}"


@pytest.mark.slow
@pytest.mark.notebooks
@pytest.mark.timeout(TIMEOUT + 120, func_only=True)
def test_claims_take_the_other_branch_on_shuffled_labels(runs_dir: Path, kernel: str) -> None:  # noqa: F811
    """Notebook 04 with (language, script) shuffled among the documents (``SHUFFLE_LABELS``): the routing says
    nothing about the labels, so its check cell must print that the headline claims do not hold (the computed
    sentences take their other branch), while its prose numbers stay backed by its outputs."""
    source = next(p for p in NOTEBOOKS if p.stem.startswith("04"))
    cells = _executed_cells(source, kernel, {"RUNS": str(runs_dir), "SHUFFLE_LABELS": True})
    assert not unbacked(source.stem, cells)
    text = output_text(cells)
    verdicts = dict((claim.split(" (")[0][:60], head) for head, claim in
                    re.findall(r"^(holds|does not hold for [^:]*): (.*)$", text, flags=re.M))
    assert verdicts, "the check cell printed no claim"
    failed = {c for c, head in verdicts.items() if head.startswith("does not hold for demo with shuffled labels")}
    assert any(c.startswith("best-layer NMI") and "untrained" not in c for c in failed), verdicts
    assert any(c.startswith("the expert says something about the language beyond") for c in failed), verdicts
    assert any(c.startswith("languages of different scripts diverge more") for c in failed), verdicts
    assert failed == set(verdicts), f"claims that hold on shuffled labels: {set(verdicts) - failed}"
    assert "Control run" in text and "training did not add information beyond the token" in text
