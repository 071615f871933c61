"""The embedded default model: a byte-level BPE tokenizer and a tiny Qwen3-MoE trained on CPU on the demo corpus.

``demo_model_path("trained")`` returns a directory that ``from_pretrained`` reads (config, safetensors weights,
tokenizer); the first call trains the model (about 4 minutes on one CPU core) and caches it under
``$MOE_ROUTING_CACHE/<version>`` (default ``~/.cache/moe_routing/demo-v2``, the reproducible recipe;
``MOE_ROUTING_DEMO_VERSION=demo-v1`` selects the original one, see ``RECIPES``)::

    demo-v2/
      trained/     config.json, model.safetensors, tokenizer files, demo_facts.json
      untrained/   the same model at its initial weights (same seed, same tokenizer): the baseline

The cache is written to a temporary directory and renamed into place, so an interrupted run never leaves a half
cache; a cache whose files are incomplete is rebuilt.

The model (``qwen3_moe``): 4 layers, hidden 128, 4 heads (2 KV heads), 16 experts, top-2 with renormalised top-k
weights, expert width 128, vocabulary 4096, tied embeddings. It is trained on the ``train`` split of
``load_corpus("demo")`` (24 languages mixed; each text is one sequence, batched by similar length, padded on the
right, batches shuffled) with next-token loss plus the load-balancing loss (``router_aux_loss_coef=0.01``), AdamW,
warm-up and cosine decay, for a fixed number of steps (demo-v2: one training thread and deterministic kernels,
whatever the process's thread settings, so the same software gives bit-identical weights on any machine of this
kind; demo-v1: 2 threads on idle cores, 1 under load, with a wall-clock cap, see ``default_threads``); experts
backend: ``grouped_mm`` (1.05-1.2x ``eager`` on CPU; ``batched_mm`` is far slower). ``demo_facts.json`` records
the weights' SHA-256 (:func:`weights_sha256`).

Run ``python -m moe_routing.demo`` to train (or find) the cache and print its facts.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DEMO_MODEL_ID = "demo"
DEMO_VERSION = "demo-v2"
FACTS_FILE = "demo_facts.json"

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 4096

MODEL_CONFIG: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 256,  # dense MLP width; unused, every layer is MoE
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "moe_intermediate_size": 128,
    "num_experts": 16,
    "num_experts_per_tok": 2,
    "norm_topk_prob": True,
    "router_aux_loss_coef": 0.01,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}

#: Training recipe (part of the cache's identity: change it and bump DEMO_VERSION).
TRAIN_STEPS = 600
BATCH_TOKENS = 2048  # padded tokens per batch
MAX_LEN = 128  # longer texts are cut
LR = 3e-3
WARMUP = 30
MIN_LR_RATIO = 0.1
WEIGHT_DECAY = 0.01
THREADS = 2
EXPERTS_IMPLEMENTATION = "grouped_mm"
DEFAULT_SECONDS = 200.0

#: How each cache version sets the training threads, the wall-clock cap and torch's deterministic mode
#: (``threads=None``: ``default_threads()``, i.e. from the machine's load). Same steps, data and seed in both.
#: ``demo-v1``: the original recipe; its weights depend on the load (1 or 2 threads) and, when the 200 s cap
#: binds, on the machine's speed. ``demo-v2``: reproducible: always 1 training thread whatever
#: ``OMP_NUM_THREADS`` says (1 and 2 threads give different weights: measured by
#: ``benchmarks/demo_reproducibility.py``), a cap that binds only on a stalled machine, deterministic kernels.
#: ``MOE_ROUTING_DEMO_VERSION`` selects one (default ``DEMO_VERSION``, demo-v2); each has its own cache directory.
RECIPES: dict[str, dict[str, Any]] = {
    "demo-v1": {"threads": None, "seconds": DEFAULT_SECONDS, "deterministic": False},
    "demo-v2": {"threads": 1, "seconds": 3600.0, "deterministic": True},
}

_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", FACTS_FILE)


# ---------------------------------------------------------------------------------------------- cache
def cache_root() -> Path:
    """``$MOE_ROUTING_CACHE`` or ``~/.cache/moe_routing``."""
    env = os.environ.get("MOE_ROUTING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moe_routing"


def demo_version() -> str:
    """The cache version in use: ``$MOE_ROUTING_DEMO_VERSION`` or ``DEMO_VERSION`` (a key of ``RECIPES``)."""
    version = os.environ.get("MOE_ROUTING_DEMO_VERSION") or DEMO_VERSION
    if version not in RECIPES:
        from .errors import MoERoutingError

        raise MoERoutingError(f"MOE_ROUTING_DEMO_VERSION={version!r} is not a demo recipe; use one of "
                              f"{sorted(RECIPES)} (or unset it for {DEMO_VERSION}).")
    return version


def demo_cache_dir() -> Path:
    return cache_root() / demo_version()


def _complete(root: Path) -> bool:
    return all((root / which / name).is_file() for which in ("trained", "untrained") for name in _REQUIRED)


def demo_model_path(which: str = "trained", *, retrain: bool = False) -> Path:
    """Directory of the demo model (``which="trained"`` or ``"untrained"``), training it first when absent.

    The first call trains for about 4 minutes on one CPU core (a progress bar and a one-line notice go to stderr);
    later calls return the cached directory at once. ``retrain=True`` rebuilds the cache.
    """
    if which not in ("trained", "untrained"):
        raise ValueError(f"which must be 'trained' or 'untrained', got {which!r}.")
    root = demo_cache_dir()
    if retrain or not _complete(root):
        print(
            f"moe_routing: training the demo MoE model (about 4 min on one CPU core, once); cache: {root}",
            file=sys.stderr,
            flush=True,
        )
        _build_cache(root, replace=retrain or root.exists())
    return root / which


def _build_cache(root: Path, *, replace: bool) -> None:
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is an ordinary directory
    try:
        train_demo_model(tmp)
        if replace and root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}-{time.time_ns()}"
            os.rename(root, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, root)
        except OSError:
            if not _complete(root):  # not another process's finished cache: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_facts(which: str = "trained") -> dict[str, Any]:
    """The training facts of the cached demo model (trains it first when absent)."""
    return json.loads((demo_model_path(which) / FACTS_FILE).read_text(encoding="utf-8"))


def weights_sha256(model_dir: str | os.PathLike) -> str:
    """SHA-256 of a saved model's tensors: names in sorted order, dtype, shape and raw bytes of each.

    Independent of the safetensors header layout, so two directories hash alike exactly when every tensor is
    bit-identical. ``demo_facts.json`` records it for both models (``weights_sha256``).
    """
    import hashlib

    import torch
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer (``VOCAB_SIZE`` tokens, pad and end-of-text specials) as PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="right",
        model_max_length=MODEL_CONFIG["max_position_embeddings"],
    )


# ---------------------------------------------------------------------------------------------- data
def _batches(lengths: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of texts grouped by similar length into batches of at most ``BATCH_TOKENS`` padded tokens."""
    order = np.argsort(lengths + rng.random(len(lengths)), kind="stable")  # random tie-break
    batches: list[np.ndarray] = []
    cur: list[int] = []
    cur_max = 0
    for i in order:
        n = int(lengths[i])
        if cur and max(cur_max, n) * (len(cur) + 1) > BATCH_TOKENS:
            batches.append(np.array(cur))
            cur, cur_max = [], 0
        cur.append(i)
        cur_max = max(cur_max, n)
    if cur:
        batches.append(np.array(cur))
    rng.shuffle(batches)
    return batches


def _collate(seqs: list[list[int]], idx: np.ndarray, pad_id: int):
    import torch

    width = max(len(seqs[i]) for i in idx)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(idx), width), dtype=torch.long)
    for row, i in enumerate(idx):
        s = seqs[i]
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _mean_loss(model, seqs: list[list[int]], pad_id: int) -> float:
    """Mean next-token cross-entropy (nats per predicted token) over ``seqs``, padding excluded."""
    import torch

    lengths = np.array([len(s) for s in seqs])
    total, count = 0.0, 0
    with torch.no_grad():
        for idx in _batches(lengths, np.random.default_rng(0)):
            ids, mask, labels = _collate(seqs, idx, pad_id)
            logits = model(input_ids=ids, attention_mask=mask, output_router_logits=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                ignore_index=-100, reduction="sum",
            )  # fmt: skip
            total += float(loss)
            count += int((labels[:, 1:] != -100).sum())
    return total / max(count, 1)


# ---------------------------------------------------------------------------------------------- training
def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    from ._version import __version__

    return {
        "moe_routing": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "python": platform.python_version(),
    }


def train_demo_model(
    out_dir: str | os.PathLike,
    *,
    seconds: float | None = None,
    steps: int = TRAIN_STEPS,
    seed: int = 0,
    threads: int | None = None,
    deterministic: bool | None = None,
    progress: bool = True,
    version: str | None = None,
) -> dict[str, Any]:
    """Train the tokenizer and the tiny MoE; write ``out_dir/trained`` and ``out_dir/untrained``; return the facts.

    Training runs ``steps`` optimiser steps, or stops earlier when ``seconds`` of wall-clock time are spent (the
    learning-rate schedule follows whichever of the two is further along, so a cut run still ends annealed;
    ``facts["stopped_by"]`` says which). Same seed, thread count and machine, with the step budget binding
    (``stopped_by == "steps"``): same weights; a run cut by the clock depends on the machine's speed.

    Args:
        out_dir: created if needed; receives ``trained/`` and ``untrained/`` (weights, tokenizer, facts JSON).
        seconds: wall-clock cap of the training loop (tokenizer, evaluation and saving come on top, ~15-30 s);
            default: the recipe's (``RECIPES[version]``).
        steps: optimiser steps of ``BATCH_TOKENS`` padded tokens each.
        seed: model initialisation, data order and the demo corpus's held-out split.
        threads: torch threads while training (restored afterwards); default: the recipe's (demo-v1:
            ``default_threads()``, demo-v2: 1). Different thread counts give different weights.
        deterministic: ``torch.use_deterministic_algorithms(True, warn_only=True)`` while training (restored
            afterwards): kernels with a deterministic variant use it, the others warn instead of failing;
            default: the recipe's (measured on CPU: the same weights either way).
        progress: show a tqdm bar on stderr.
        version: the recipe (a key of ``RECIPES``), default ``demo_version()``; recorded in the facts.

    The facts record ``weights_sha256`` / ``untrained_weights_sha256`` (:func:`weights_sha256`) and
    ``tokenizer_sha256``, so two caches can be compared without loading them.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    from .corpora import load_corpus

    out = Path(out_dir)
    t_start = time.perf_counter()
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    version = version or demo_version()
    recipe = RECIPES[version]
    seconds = float(recipe["seconds"] if seconds is None else seconds)
    deterministic = bool(recipe["deterministic"] if deterministic is None else deterministic)
    threads = threads or recipe["threads"]
    prev_threads = torch.get_num_threads()
    prev_det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    n_threads = int(threads or default_threads())
    torch.set_num_threads(n_threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)

        train_df = load_corpus("demo", split="train", seed=seed)
        held_df = load_corpus("demo", split="heldout", seed=seed)
        tokenizer = train_tokenizer(train_df["text"].tolist())
        eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)

        def encode(texts: list[str]) -> list[list[int]]:
            enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
            return [[*ids[: MAX_LEN - 1], eos_id] for ids in enc]

        train_seqs = encode(train_df["text"].tolist())
        held_seqs = encode(held_df["text"].tolist())
        # a train sample as large as the held-out set, to compare the two losses on equal terms
        probe = rng.choice(len(train_seqs), size=min(len(held_seqs), len(train_seqs)), replace=False)
        train_probe = [train_seqs[i] for i in probe]
        lengths = np.array([len(s) for s in train_seqs])

        config = AutoConfig.for_model(
            "qwen3_moe", **MODEL_CONFIG, output_router_logits=True,
            pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=eos_id,
        )  # fmt: skip
        config._experts_implementation = EXPERTS_IMPLEMENTATION
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.eval()
        untrained_heldout = _mean_loss(model, held_seqs, pad_id)
        _save(model, tokenizer, out / "untrained")

        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
            lr=LR, betas=(0.9, 0.95), eps=1e-8,
        )  # fmt: skip

        def lr_at(progress: float, step: int) -> float:
            if step < WARMUP:
                return LR * (step + 1) / WARMUP
            cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            return LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * cos)

        model.train()
        t_train = time.perf_counter()
        tokens_seen, step, epoch, stopped_by = 0, 0, 0, "steps"
        recent: list[float] = []
        aux_recent: list[float] = []
        bar = tqdm(total=steps, desc="training demo MoE", unit="step", disable=not progress, file=sys.stderr)
        batches: list[np.ndarray] = []
        while True:
            elapsed = time.perf_counter() - t_train
            progress_frac = max(step / steps, elapsed / seconds)
            if progress_frac >= 1.0:
                stopped_by = "steps" if step >= steps else "time"
                break
            if not batches:
                batches = _batches(lengths, rng)
                epoch += 1
            idx = batches.pop()
            ids, mask, labels = _collate(train_seqs, idx, pad_id)
            for group in opt.param_groups:
                group["lr"] = lr_at(progress_frac, step)
            out_ = model(input_ids=ids, attention_mask=mask, labels=labels)
            out_.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            tokens_seen += int(mask.sum())
            step += 1
            loss_value, aux_value = float(out_.loss.detach()), float(out_.aux_loss.detach())
            recent = [*recent[-49:], loss_value - MODEL_CONFIG["router_aux_loss_coef"] * aux_value]
            aux_recent = [*aux_recent[-49:], aux_value]
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(recent):.3f}", aux=f"{np.mean(aux_recent):.3f}")
        bar.close()
        train_seconds = time.perf_counter() - t_train
        if stopped_by == "time":
            print(f"moe_routing: demo training stopped by the {seconds:.0f} s clock after {step} of {steps} steps: "
                  "these weights depend on this machine's speed (see demo_facts.json 'stopped_by').",
                  file=sys.stderr, flush=True)

        model.eval()
        facts: dict[str, Any] = {
            "model_id": DEMO_MODEL_ID,
            "version": version,
            "seed": seed,
            "steps": step,
            "max_steps": steps,
            "max_seconds": seconds,
            "stopped_by": stopped_by,
            "epochs": round(step / max(len(_batches(lengths, np.random.default_rng(0))), 1), 2),
            "train_seconds": round(train_seconds, 1),
            "total_seconds": None,
            "tokens_seen": tokens_seen,
            "tokens_per_second": round(tokens_seen / train_seconds, 1),
            "train_loss_last50": round(float(np.mean(recent)), 4) if recent else None,
            "aux_loss_last50": round(float(np.mean(aux_recent)), 4) if aux_recent else None,
            "train_loss": round(_mean_loss(model, train_probe, pad_id), 4),
            "heldout_loss": round(_mean_loss(model, held_seqs, pad_id), 4),
            "untrained_heldout_loss": round(untrained_heldout, 4),
            "threads": n_threads,
            "deterministic_algorithms": bool(deterministic),
            "recipe": dict(recipe),
            "load_average_at_start": round(load_at_start, 2),
            "experts_implementation": EXPERTS_IMPLEMENTATION,
            "batch_tokens": BATCH_TOKENS,
            "lr": LR,
            "model_config": dict(MODEL_CONFIG),
            "corpus": {
                "spec": "demo",
                "languages": sorted(train_df["lang"].unique().tolist()),
                "train_texts": len(train_seqs),
                "heldout_texts": len(held_seqs),
                "train_tokens_per_epoch": int(lengths.sum()),
            },
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        _save(model, tokenizer, out / "trained")
        facts["weights_sha256"] = weights_sha256(out / "trained")
        facts["untrained_weights_sha256"] = weights_sha256(out / "untrained")
        facts["tokenizer_sha256"] = file_sha256(out / "trained" / "tokenizer.json")
        facts["total_seconds"] = round(time.perf_counter() - t_start, 1)
        for which in ("trained", "untrained"):
            text = json.dumps({**facts, "weights": which}, indent=2, ensure_ascii=False)
            (out / which / FACTS_FILE).write_text(text + "\n", encoding="utf-8")
        return facts
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det[0], warn_only=prev_det[1])


def default_threads() -> int:
    """2 threads on idle cores, 1 as soon as other work is running.

    Measured on 2 cores (training steps, interleaved, medians): idle, 2 threads gave 8.4-8.9k tokens/s against
    5.0-5.3k for 1 thread; with other processes on the cores, 2 threads swung between 0.15x and 1.7x of one thread
    in training and ran forward passes 7-14x slower (each op waits for the descheduled thread), while 1 thread
    kept about 60% of its idle speed.
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - Windows
        load = 0.0
    return 1 if cores < 2 or load > cores - 1.5 else min(THREADS, cores)


def _save(model, tokenizer, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    output_router_logits = model.config.output_router_logits
    model.config.output_router_logits = False  # a training-time switch; inference does not need it
    try:
        model.save_pretrained(path, safe_serialization=True)
    finally:
        model.config.output_router_logits = output_router_logits
    tokenizer.save_pretrained(path)


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m moe_routing.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--retrain", action="store_true", help="rebuild the cache even when it is complete")
    args = parser.parse_args(argv)
    path = demo_model_path("trained", retrain=args.retrain)
    facts = json.loads((path / FACTS_FILE).read_text(encoding="utf-8"))
    print(f"demo model: {path}")
    print(f"untrained:  {path.parent / 'untrained'}")
    print(json.dumps(facts, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# ---------------------------------------------------------------------------------------------- public helpers
# (for the teaching notebook and other training loops; appended, the private names above stay)
def save_checkpoint(model, tokenizer, path: str | os.PathLike) -> Path:
    """``save_pretrained`` of ``model`` (safetensors, without the training-time ``output_router_logits``) and
    ``tokenizer`` into ``path``; the path."""
    path = Path(path)
    _save(model, tokenizer, path)
    return path


def mean_loss(model, seqs: list[list[int]], pad_id: int) -> float:
    """Mean next-token cross-entropy (nats per predicted token) over token-id sequences ``seqs``, padding
    excluded; the same length-bucketed batches in the same order on every call."""
    return _mean_loss(model, seqs, pad_id)


def demo_tokenizer(*, seed: int = 0):
    """The demo's tokenizer without training the demo model: the cached one when the demo model exists, else
    the same BPE trained on the demo's training texts (seconds)."""
    root = demo_cache_dir()
    if _complete(root):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(root / "trained")
    from .corpora import load_corpus

    return train_tokenizer(load_corpus("demo", split="train", seed=seed)["text"].tolist())
