"""moe_routing.demo: the tiny Qwen3-MoE trained on the demo corpus, its cache, and the measured claim.

The claim: on held-out demo text, the normalised mutual information between language and top-1 expert,
NMI = I(lang; top1) / H(lang) over real (non-padding) tokens, reaches >= 0.25 in some MoE layer of the trained
model and is >= 2x the untrained model's NMI in that layer. The routing is read with a forward pre-hook on each
``model.model.layers[i].mlp.experts`` (independently of moe_routing.capture, which is cross-checked against it), and
NMI is computed with sklearn / scipy, not with the package's metrics.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

BATCH = 64


@pytest.fixture(scope="session")
def demo_paths() -> dict[str, Path]:
    from moe_routing.demo import demo_model_path

    return {which: demo_model_path(which) for which in ("trained", "untrained")}


@pytest.fixture(scope="session")
def heldout():
    from moe_routing.corpora import load_corpus

    return load_corpus("demo", split="heldout")


def _load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # one thread: on shared cores two threads were measured 5-15x slower than one (they wait on each other)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    return model, tok


def _route_local_hook(model, tok, texts: list[str], *, sort: bool = True):
    """Routing of the real tokens of ``texts`` via forward pre-hooks on each ``mlp.experts``.

    Returns ``top1 [tokens, layers]`` (the slot with the largest weight), ``index [tokens, layers, k]`` and
    ``doc [tokens]`` (index into ``texts``). ``sort`` batches texts of similar length together (less padding).
    """
    import torch

    layers = model.model.layers
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(i: int):
        def hook(module, args):
            _hidden, index, weights = args  # [T, H], [T, k], [T, k]; T = batch * seq
            seen[i] = (index.detach().clone(), weights.detach().clone())
            return None

        return hook

    order = np.argsort([len(t) for t in texts], kind="stable") if sort else np.arange(len(texts))
    handles = [layer.mlp.experts.register_forward_pre_hook(make_hook(i)) for i, layer in enumerate(layers)]
    tops, idxs, doc = [], [], []
    try:
        for start in range(0, len(texts), BATCH):
            rows = order[start : start + BATCH]
            batch = tok([texts[r] for r in rows], return_tensors="pt", padding=True)
            seen.clear()
            with torch.no_grad():
                model(**batch)
            mask = batch["attention_mask"].reshape(-1).bool()
            index = torch.stack([seen[i][0][mask] for i in range(len(layers))], dim=1)  # [t, layers, k]
            weights = torch.stack([seen[i][1][mask] for i in range(len(layers))], dim=1)
            tops.append(index.gather(2, weights.argmax(dim=2, keepdim=True))[:, :, 0].numpy())
            idxs.append(index.numpy())
            doc.append(np.repeat(rows, batch["attention_mask"].sum(dim=1).numpy()))
    finally:
        for h in handles:
            h.remove()
    return np.concatenate(tops), np.concatenate(idxs), np.concatenate(doc)


def _top1_capture(model, tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The same through moe_routing.capture (``trace.top1()`` is ``[tokens, layers]``)."""
    import torch

    from moe_routing.capture import capture

    tops, doc = [], []
    for start in range(0, len(texts), BATCH):
        batch = tok(texts[start : start + BATCH], return_tensors="pt", padding=True)
        with capture(model) as rec, torch.no_grad():
            model(**batch)
        trace = rec.trace()
        tops.append(trace.top1())
        doc.append(trace.doc_ids - trace.doc_ids.min() + start)
    return np.concatenate(tops), np.concatenate(doc)


def _nmi(labels: np.ndarray, top1: np.ndarray) -> list[float]:
    from scipy.stats import entropy
    from sklearn.metrics import mutual_info_score

    _, counts = np.unique(labels, return_counts=True)
    h = entropy(counts)  # nats, like mutual_info_score
    return [float(mutual_info_score(labels, top1[:, j]) / h) for j in range(top1.shape[1])]


@pytest.fixture(scope="session")
def routing(demo_paths, heldout):
    texts = heldout["text"].tolist()
    langs = heldout["lang"].to_numpy()
    out = {}
    for which, path in demo_paths.items():
        model, tok = _load(path)
        top1, index, doc = _route_local_hook(model, tok, texts)
        out[which] = {
            "top1": top1,
            "index": index,
            "doc": doc,
            "lang": langs[doc],
            "nmi": _nmi(langs[doc], top1),
        }
    print(
        "\nNMI(lang; top-1 expert) on held-out demo text, per layer: "
        f"trained {np.round(out['trained']['nmi'], 3).tolist()}, "
        f"untrained {np.round(out['untrained']['nmi'], 3).tolist()}"
    )
    return out


# ------------------------------------------------------------------------------------------------ the claim
def test_language_specialisation_claim(routing):
    trained, untrained = routing["trained"]["nmi"], routing["untrained"]["nmi"]
    assert len(trained) == len(untrained) == 4
    ok = [j for j in range(4) if trained[j] >= 0.25 and trained[j] >= 2 * untrained[j]]
    assert ok, f"no layer with NMI >= 0.25 and >= 2x untrained: trained {trained}, untrained {untrained}"


def test_measurement_covers_every_heldout_language_and_real_tokens_only(routing, heldout, demo_paths):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_paths["trained"])
    n_real = sum(len(ids) for ids in tok(heldout["text"].tolist())["input_ids"])
    for which in ("trained", "untrained"):
        r = routing[which]
        assert r["top1"].shape == (n_real, 4)  # [tokens, layers], padding excluded
        assert r["index"].shape == (n_real, 4, 2)  # [tokens, layers, k]
        assert np.bincount(r["doc"], minlength=len(heldout)).min() >= 1  # every text has tokens
        assert set(r["lang"]) == set(heldout["lang"]) and len(set(r["lang"])) >= 24
        assert r["top1"].min() >= 0 and r["top1"].max() < 16


def test_trained_routing_did_not_collapse(routing):
    """The load-balancing loss was on: in every layer the top-k slots spread over many experts (a collapsed router
    would send everything to the same 2); the untrained router is near uniform."""
    for which, min_effective in (("trained", 6.0), ("untrained", 14.0)):
        index = routing[which]["index"]
        for j in range(index.shape[1]):
            share = np.bincount(index[:, j].reshape(-1), minlength=16) / index[:, j].size
            nz = share[share > 0]
            effective = float(np.exp(-(nz * np.log(nz)).sum()))  # exp(entropy): experts in use
            assert effective >= min_effective and share.max() < 0.3, (which, j, share.round(3).tolist())


def test_capture_agrees_with_the_local_hook(demo_paths, heldout):
    model, tok = _load(demo_paths["trained"])
    texts = heldout["text"].tolist()[:512]
    got = _top1_capture(model, tok, texts)
    top1, _index, doc = _route_local_hook(model, tok, texts, sort=False)
    assert np.array_equal(got[1], doc)
    assert np.array_equal(got[0], top1)


# ------------------------------------------------------------------------------------------------ the cache
def test_cache_layout_and_facts(demo_paths):
    from transformers import AutoConfig

    from moe_routing.demo import DEMO_MODEL_ID, FACTS_FILE, demo_cache_dir

    assert demo_paths["trained"].parent == demo_paths["untrained"].parent == demo_cache_dir()
    for which, path in demo_paths.items():
        for name in (
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            FACTS_FILE,
        ):
            assert (path / name).is_file(), (which, name)
        config = AutoConfig.from_pretrained(path)
        assert config.model_type == "qwen3_moe"
        assert (config.num_experts, config.num_experts_per_tok, config.hidden_size) == (16, 2, 128)
        assert config.num_hidden_layers == 4 and config.norm_topk_prob is True and not config.mlp_only_layers
        assert config.output_router_logits is False  # a training switch, off for inference
    facts = json.loads((demo_paths["trained"] / FACTS_FILE).read_text())
    assert facts["model_id"] == DEMO_MODEL_ID and facts["seed"] == 0
    assert facts["train_seconds"] <= facts["max_seconds"] + 30
    assert facts["tokens_per_second"] > 0 and facts["steps"] > 0
    assert facts["heldout_loss"] < facts["untrained_heldout_loss"] - 2.0  # it learned something
    assert facts["train_loss"] <= facts["heldout_loss"] + 0.5
    assert {"torch", "transformers", "tokenizers", "moe_routing"} <= set(facts["versions"])
    assert len(facts["corpus"]["languages"]) >= 24


def test_untrained_is_the_initial_weights_with_the_same_tokenizer(demo_paths):
    import torch
    from safetensors.torch import load_file

    t = demo_paths["trained"]
    u = demo_paths["untrained"]
    assert (t / "tokenizer.json").read_bytes() == (u / "tokenizer.json").read_bytes()
    wt, wu = load_file(t / "model.safetensors"), load_file(u / "model.safetensors")
    assert wt.keys() == wu.keys()
    router = "model.layers.0.mlp.gate.weight"
    assert router in wu and float(wu[router].std()) > 0  # routers start random, not zero
    assert not torch.equal(wt[router], wu[router])


def test_tokenizer(demo_paths):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(demo_paths["trained"])
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert 3500 <= len(tok) <= 4096
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    for text in ("Hello world", "Привет, мир", "こんにちは世界", "مرحبا", "ქართული 🙂"):
        ids = tok(text)["input_ids"]
        assert tok.pad_token_id not in ids
        assert tok.decode(ids) == text  # byte level: lossless, no unknown token
    batch = tok(["a", "longer text here"], padding=True)
    assert batch["attention_mask"][0][-1] == 0  # pads on the right


def test_demo_model_path_reuses_a_complete_cache(demo_paths):
    """A complete cache is found again, not rebuilt: no file of it is rewritten (how long the lookup takes is
    measured by benchmarks/startup_times.py)."""
    from moe_routing.demo import demo_model_path

    root = demo_paths["trained"].parent
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = demo_model_path("trained")
    assert again == demo_paths["trained"]
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match="trained"):
        demo_model_path("half-trained")


def test_cli_reports_the_cache(demo_paths):
    out = subprocess.run(
        [sys.executable, "-m", "moe_routing.demo"], capture_output=True, text=True, check=True, timeout=120
    )
    assert str(demo_paths["trained"]) in out.stdout
    assert '"heldout_loss"' in out.stdout and "training" not in out.stderr


def test_short_training_runs_are_reproducible_complete_and_loadable(tmp_path, monkeypatch):
    """Two real 4-step runs with the same seed: identical weights; both directories complete and loadable, and
    found by demo_model_path without training; a cache missing a file counts as incomplete."""
    import torch
    from safetensors.torch import load_file

    from moe_routing import demo

    runs = {}
    for name in ("a", "b"):
        root = tmp_path / name / demo.demo_version()  # the cache directory demo_model_path looks in
        facts = demo.train_demo_model(root, steps=4, seconds=300, seed=1, threads=1, progress=False)
        assert facts["steps"] == 4 and facts["stopped_by"] == "steps" and facts["seed"] == 1
        assert demo._complete(root)
        runs[name] = root
    for which in ("trained", "untrained"):
        wa = load_file(runs["a"] / which / "model.safetensors")
        wb = load_file(runs["b"] / which / "model.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), which
    assert (runs["a"] / "trained" / "tokenizer.json").read_bytes() == (
        runs["b"] / "trained" / "tokenizer.json"
    ).read_bytes()

    root = runs["a"]
    model, tok = _load(root / "trained")
    with torch.no_grad():
        out = model(**tok(["Guten Tag", "Bonjour"], return_tensors="pt", padding=True))
    assert out.logits.shape[-1] == model.config.vocab_size
    monkeypatch.setenv("MOE_ROUTING_CACHE", str(root.parent))
    assert demo.demo_model_path("untrained") == root / "untrained"  # complete: no training
    (root / "untrained" / "model.safetensors").unlink()
    assert not demo._complete(root)
