"""Data-parallel capture with torchrun (gloo, 2 CPU processes) equals a single-process run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import moe_routing as mr
from test_pipeline import TEXTS


def test_torchrun_two_ranks_equal_single_process(qwen3_moe, tokenizer, tmp_path):
    out = tmp_path / "dist"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("dist_capture_worker.py")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(worker),
         str(out)], capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): another thread count changes float32 sums
    try:
        single = mr.capture_corpus(qwen3_moe, tokenizer, TEXTS, tmp_path / "single", batch_size=4,
                                   batches_per_shard=1, max_length=32, progress=False)
    finally:
        torch.set_num_threads(threads)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["world_size"] == 2
    assert sorted(r["rank"] for r in manifest["ranks"]) == [0, 1]
    assert all(r["shards_written"] > 0 for r in manifest["ranks"])
    a, b = mr.RoutingTrace.load(out), single.read()
    assert a.equals(b)
    assert np.array_equal(a.doc_ids, b.doc_ids)
    # the document index rank 0 writes from the plan matches the rows both ranks wrote
    index = mr.open_trace(out).document_index()
    assert index is not None and index.equals(single.document_index())
    docs = [0, int(a.doc_ids.max())]
    assert mr.open_trace(out).read_documents(docs).equals(a.select(np.isin(a.doc_ids, docs)))
