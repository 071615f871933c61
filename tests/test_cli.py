"""The moe-routing command line: every user error exits 2 with ``moe-routing: error: ...`` and no traceback,
before any corpus or model is loaded; ``--text-column`` and ``--label``; ``demo`` from any directory, exit 1
when a notebook fails. Real files and a tiny real model saved to disk; no mocks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_routing.cli import main
from moe_routing.store import TraceReader

ROOT = Path(__file__).resolve().parents[1]
ANALYSIS = ROOT / "analysis"


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """(exit status, stderr) of ``moe-routing ARGV`` run in this process (argparse errors exit through SystemExit)."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    return int(code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen3_moe, tokenizer) -> Path:
    path = tmp_path_factory.mktemp("model") / "tiny-qwen3-moe"
    qwen3_moe.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def corpus_csv(tmp_path) -> Path:
    path = tmp_path / "corpus.csv"
    path.write_text("body,domain,lang,extra\nHello there world.,web,en,a\nDer Hund bellt laut.,prose,de,b\n",
                    encoding="utf-8")
    return path


def capture_args(model: str | Path, corpus: str | Path, out: Path, *extra: str) -> list[str]:
    return ["capture", "--model", str(model), "--corpus", str(corpus), "--out", str(out), *extra]


NO_MODEL = "/nonexistent/model-that-would-fail-later"


@pytest.mark.parametrize(("option", "value", "message"), [
    ("--batch-size", "0", "argument --batch-size: must be at least 1, got 0"),
    ("--batch-size", "two", "argument --batch-size: expected a whole number >= 1, got 'two'"),
    ("--max-tokens", "0", "argument --max-tokens: must be at least 1, got 0"),
    ("--max-tokens", "-5", "argument --max-tokens: must be at least 1, got -5"),
    ("--max-length", "0", "argument --max-length: must be at least 1, got 0"),
    ("--dtype", "fp8", "argument --dtype: invalid choice: 'fp8'"),
    ("--dtype", "float64", "argument --dtype: invalid choice: 'float64'"),
])
def test_bad_option_values_exit_2_with_one_error_line(capsys, tmp_path, option, value, message):
    code, err = run_cli(capsys, *capture_args(NO_MODEL, "demo", tmp_path / "t", option, value))
    assert code == 2
    assert f"moe-routing: error: {message}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "t").exists()


def test_a_device_this_machine_lacks_is_refused_before_any_work(capsys, tmp_path):
    missing_corpus = tmp_path / "missing.jsonl"  # would fail next: the device is checked first
    n = torch.cuda.device_count()
    code, err = run_cli(capsys, *capture_args(NO_MODEL, missing_corpus, tmp_path / "t", "--device", f"cuda:{n}"))
    assert code == 2 and err.startswith("moe-routing: error: --device cuda:")
    assert "Traceback" not in err and "missing.jsonl" not in err
    if not torch.cuda.is_available():
        code, err = run_cli(capsys, *capture_args(NO_MODEL, missing_corpus, tmp_path / "t", "--device", "cuda"))
        assert code == 2 and "moe-routing: error: --device cuda: CUDA is not available" in err
    code, err = run_cli(capsys, *capture_args(NO_MODEL, missing_corpus, tmp_path / "t", "--device", "gpu0"))
    assert code == 2 and "is not a device" in err


def test_errors_exit_2_without_traceback_in_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ANALYSIS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for args in (["--batch-size", "0"], ["--dtype", "float64"], ["--device", "cuda:99"]):
        out = subprocess.run([sys.executable, "-m", "moe_routing", *capture_args(NO_MODEL, "demo", tmp_path, *args)],
                             capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.strip().splitlines()[-1].startswith("moe-routing: error: "), out.stderr
        assert "Traceback" not in out.stderr


def test_jsonl_list_column_is_refused_before_the_model_loads(capsys, tmp_path):
    path = tmp_path / "tags.jsonl"
    rows = [{"text": "Hello.", "tags": ["a", "b"]}, {"text": "Hallo.", "tags": ["c"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    code, err = run_cli(capsys, *capture_args(NO_MODEL, path, tmp_path / "t"))
    assert code == 2 and "Traceback" not in err
    assert "moe-routing: error: label column 'tags' holds a list in record 0" in err and "--label" in err
    assert "could not load model" not in err  # refused before the model
    text_list = tmp_path / "text_list.jsonl"
    text_list.write_text(json.dumps({"text": ["two", "parts"]}), encoding="utf-8")
    code, err = run_cli(capsys, *capture_args(NO_MODEL, text_list, tmp_path / "t"))
    assert code == 2 and "record 0 has a list in the text column 'text'" in err


def test_unknown_label_and_missing_text_column_exit_2(capsys, tmp_path, corpus_csv):
    code, err = run_cli(capsys, *capture_args(NO_MODEL, corpus_csv, tmp_path / "t", "--text-column", "body",
                                              "--label", "topic"))
    assert code == 2 and "label columns ['topic'] are not in the corpus" in err
    code, err = run_cli(capsys, *capture_args(NO_MODEL, corpus_csv, tmp_path / "t"))
    assert code == 2 and "has no column 'text'" in err and "--text-column" in err


def test_text_column_and_repeated_labels_shape_the_trace(capsys, tmp_path, corpus_csv, model_dir):
    out = tmp_path / "t"
    code, err = run_cli(capsys, *capture_args(model_dir, corpus_csv, out, "--text-column", "body",
                                              "--label", "domain", "--label", "lang", "--batch-size", "1"))
    assert code == 0, err
    reader = TraceReader(out)
    assert reader.complete
    assert set(reader.label_names) == {"domain", "lang", "text_index", "chunk", "phase"}  # 'extra' left out
    trace = reader.read()
    assert sorted(set(trace.labels["domain"])) == ["prose", "web"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    expected = sum(len(tok(t)["input_ids"]) for t in ["Hello there world.", "Der Hund bellt laut."])
    assert trace.num_tokens == expected  # the body column was the text


def test_report_subcommand_bad_param_exits_2(capsys, tmp_path):
    code, err = run_cli(capsys, "report", "--param", "novalue", "--out", str(tmp_path / "r"))
    assert code == 2 and "moe-routing: error: --param needs KEY=VALUE" in err
    code, err = run_cli(capsys, "report", "--notebooks", str(tmp_path / "none"), "--out", str(tmp_path / "r"))
    assert code == 2 and "notebook folder" in err and "does not exist" in err


def test_report_finds_the_project_notebooks_from_any_directory(tmp_path, monkeypatch):
    from moe_routing import report

    monkeypatch.chdir(tmp_path)
    found = report.find_notebooks("notebooks", ["01"])
    assert [p.name for p in found] == ["01_quickstart.py"]
    assert found[0].parent == ROOT / "notebooks"
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_mine.py").write_text("print(1)\n")
    assert [p.name for p in report.find_notebooks("notebooks")] == ["01_mine.py"]  # a local folder wins
    assert report.find_notebooks(None, ["01"])[0].parent == ROOT / "notebooks"  # None: always the project's


# ------------------------------------------------------------------------------------------------ demo
def _demo(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    runs = Path(os.environ.get("MOE_ROUTING_TEST_RUNS", ROOT / "runs")).resolve()  # shared with test_notebooks
    env = {**os.environ, "PYTHONPATH": f"{ANALYSIS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "moe_routing", "demo", "--out", str(runs), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=1800)


@pytest.mark.slow
@pytest.mark.notebooks
def test_demo_runs_from_another_directory_and_fails_when_a_notebook_fails(tmp_path):
    """From a directory without notebooks/: the project's quickstart runs (exit 0); with a parameter that makes
    it fail (a layer the model does not have) the command exits 1 and names the notebook."""
    ok = _demo(tmp_path, "--only", "01", "--report-dir", "report-ok")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (tmp_path / "report-ok" / "01_quickstart.html").is_file()
    assert "1 ok, 0 failed" in ok.stdout
    bad = _demo(tmp_path, "--only", "01", "--report-dir", "report-bad", "--param", "LAYER=99")
    assert bad.returncode == 1, bad.stdout + bad.stderr[-3000:]
    assert "0 ok, 1 failed: 01_quickstart" in bad.stdout
    results = json.loads((tmp_path / "report-bad" / "report.json").read_text())
    assert results[0]["status"] == "failed" and "99" in results[0]["error"]


def test_demo_bad_notebook_selection_exits_2_before_any_capture(capsys, tmp_path):
    code, err = run_cli(capsys, "demo", "--out", str(tmp_path / "runs"), "--only", "99")
    assert code == 2 and "--only ['99'] matches none of the notebooks" in err
    assert not (tmp_path / "runs").exists()
