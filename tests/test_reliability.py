"""Nothing lost: a real SIGKILL mid-run, a full disk, and re-runs."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import moe_routing as mr
from moe_routing.store import TraceReader

WORKER = Path(__file__).with_name("reliability_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(out, *extra):
    return subprocess.Popen([sys.executable, str(WORKER), str(out), *map(str, extra)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path):
    ref = _start(tmp_path / "ref")
    assert ref.wait(timeout=600) == 0, ref.stderr.read()[-2000:]
    n_ref = len(TraceReader(tmp_path / "ref").shards())

    out = tmp_path / "killed"
    proc = _start(out)
    shards = out / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and len(list(shards.glob("part-*.parquet"))) >= 5:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(shards.glob("part-*.parquet")))
    assert 0 < done < n_ref
    assert not TraceReader(out).complete

    rerun = _start(out)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()[-2000:]
    a, b = mr.RoutingTrace.load(out), mr.RoutingTrace.load(tmp_path / "ref")
    assert a.equals(b)  # no missing and no duplicated tokens
    assert not list(shards.glob(".*tmp*"))  # no temporary files left behind


@pytest.fixture
def small_disk(tmp_path):
    """A real 96 KiB filesystem (tmpfs) that fills up after a few shards; skipped where mounting is not allowed."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill a disk: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_stops_with_a_clear_message_and_keeps_completed_shards(small_disk):
    out = small_disk / "trace"
    proc = _start(out)
    assert proc.wait(timeout=600) == 3
    err = proc.stderr.read()
    assert "free disk space" in err and "re-run the same command" in err, err[-2000:]
    reader = TraceReader(out)
    assert not reader.complete and len(reader.shards()) >= 1
    with pytest.warns(UserWarning, match="incomplete"):
        assert reader.read().num_tokens > 0


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path):
    out, go = tmp_path / "trace", tmp_path / "go"
    second = _start(out, 2, go)  # other settings, same directory; waits for `go` once its model is built
    deadline = time.time() + 300
    while time.time() < deadline and not Path(f"{go}.ready").exists():
        time.sleep(0.01)
    first = _start(out)
    shards = out / "shards"
    while time.time() < deadline and first.poll() is None:
        if shards.is_dir() and len(list(shards.glob("part-*.parquet"))) >= 3:
            break
        time.sleep(0.005)
    assert first.poll() is None, "the first run finished before a second could start"
    go.write_text("go")
    assert second.wait(timeout=300) == 3
    err = second.stderr.read()
    assert first.poll() is None, "the first run finished before the second was refused: inconclusive"
    assert "is being written by process" in err and ".moe-routing.lock" in err and "another directory" in err, err
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    reader = TraceReader(out)
    assert reader.complete and not reader.verify()
    t = reader.read()
    keys = set(zip(t.labels["text_index"].tolist(), t.labels["chunk"].tolist(), t.positions.tolist(), strict=True))
    assert len(keys) == t.num_tokens  # no duplicated rows
    assert set(t.labels["text_index"].tolist()) == set(range(600))  # every text, once
    assert reader.manifest["settings"]["batch_size"] == 4


def test_a_starting_run_keeps_live_writers_temporaries(qwen3_moe, tokenizer, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        shards = tmp_path / "shards"
        shards.mkdir(parents=True)
        live_tmp = shards / f".part-000000.parquet.tmp-{sleeper.pid}"
        dead_tmp = shards / f".part-000001.parquet.tmp-{dead.pid}"
        live_tmp.write_bytes(b"in flight")
        dead_tmp.write_bytes(b"left by a killed run")
        mr.capture_corpus(qwen3_moe, tokenizer, ["a short text", "another one"], tmp_path, progress=False)
        assert live_tmp.read_bytes() == b"in flight"
        assert not dead_tmp.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
