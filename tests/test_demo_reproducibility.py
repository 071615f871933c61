"""Reproducible demo training: recipes per cache version, the recorded weights hash, thread settings.

The cross-process measurement (OMP_NUM_THREADS=1 vs 2, full recipe, headline numbers) is
benchmarks/demo_reproducibility.py; these tests check the mechanism on short real runs.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from moe_routing import MoERoutingError, demo


def test_weights_hash_sees_every_bit_and_ignores_file_order(tmp_path):
    a = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    for name, tensors in (("x", a), ("y", dict(reversed(list(a.items()))))):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"), metadata={"note": name})
    assert demo.weights_sha256(tmp_path / "x") == demo.weights_sha256(tmp_path / "y")
    changed = dict(a)
    w = a["w"].clone()
    w.view(torch.int32)[0, 0] ^= 1  # one bit of one element
    changed["w"] = w
    (tmp_path / "z").mkdir()
    save_file(changed, str(tmp_path / "z" / "model.safetensors"))
    assert demo.weights_sha256(tmp_path / "z") != demo.weights_sha256(tmp_path / "x")
    reshaped = {"w": a["w"].reshape(3, 2), "b": a["b"]}  # same bytes, another shape
    (tmp_path / "r").mkdir()
    save_file(reshaped, str(tmp_path / "r" / "model.safetensors"))
    assert demo.weights_sha256(tmp_path / "r") != demo.weights_sha256(tmp_path / "x")


def test_demo_version_selects_a_recipe_and_its_own_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_ROUTING_CACHE", str(tmp_path))
    monkeypatch.delenv("MOE_ROUTING_DEMO_VERSION", raising=False)
    assert demo.demo_version() == demo.DEMO_VERSION
    assert demo.demo_cache_dir() == tmp_path / demo.DEMO_VERSION
    monkeypatch.setenv("MOE_ROUTING_DEMO_VERSION", "demo-v2")
    assert demo.demo_cache_dir() == tmp_path / "demo-v2"
    assert demo.RECIPES["demo-v2"]["threads"] == 1
    monkeypatch.setenv("MOE_ROUTING_DEMO_VERSION", "demo-v9")
    with pytest.raises(MoERoutingError, match="demo-v9"):
        demo.demo_cache_dir()


@pytest.mark.slow
def test_v2_recipe_gives_the_same_recorded_weights_whatever_the_process_threads(tmp_path):
    """Two real 4-step runs of the demo-v2 recipe, the process set to 2 and to 1 torch threads: the recipe
    trains on 1 thread either way, records it, records hashes that match the files, and restores the caller's
    thread count and deterministic mode."""
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    facts = {}
    try:
        for name, process_threads in (("a", 2), ("b", 1)):
            torch.set_num_threads(process_threads)
            facts[name] = demo.train_demo_model(tmp_path / name, steps=4, seed=1, progress=False, version="demo-v2")
            assert torch.get_num_threads() == process_threads  # restored
            assert torch.are_deterministic_algorithms_enabled() == before[1]
    finally:
        torch.set_num_threads(before[0])
    for name, f in facts.items():
        assert f["threads"] == 1 and f["version"] == "demo-v2" and f["stopped_by"] == "steps"
        assert f["deterministic_algorithms"] is True
        assert f["weights_sha256"] == demo.weights_sha256(tmp_path / name / "trained")
        assert f["untrained_weights_sha256"] == demo.weights_sha256(tmp_path / name / "untrained")
        on_disk = json.loads((tmp_path / name / "trained" / demo.FACTS_FILE).read_text())
        assert on_disk["weights_sha256"] == f["weights_sha256"]
    assert facts["a"]["weights_sha256"] == facts["b"]["weights_sha256"]
    assert facts["a"]["tokenizer_sha256"] == facts["b"]["tokenizer_sha256"]
    assert facts["a"]["weights_sha256"] != facts["a"]["untrained_weights_sha256"]  # training moved the weights
    assert np.isclose(facts["a"]["heldout_loss"], facts["b"]["heldout_loss"])
