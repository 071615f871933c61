"""Thinking vs non-thinking routing of chat models (Qwen3 and others whose template has ``enable_thinking``).

``generate_segments(model, tokenizer, prompts, enable_thinking=...)`` runs ``generate`` inside ``capture`` and
labels every recorded token with

- ``segment``: ``"prompt"`` (the chat-formatted input), ``"think"`` (a generated token inside a ``<think>`` ...
  ``</think>`` span, the two markers included) or ``"answer"`` (a generated token outside one);
- ``mode``: ``"thinking"`` or ``"non-thinking"`` (the template's ``enable_thinking``);
- ``phase``: ``"prefill"`` / ``"decode"`` (from capture).

A span's state is read from the token ids, prompt included: a template that ends the prompt inside an open
``<think>`` (Qwen3-2507 thinking models) makes the first generated tokens ``think``; one that closes it
(``enable_thinking=False``) makes them ``answer``. ``thinking_contrasts`` then compares think vs answer tokens,
the two modes' generated tokens, and prefill vs decode, each with ``metrics.contrast``'s bootstrap CIs.
Shapes: labels are ``[tokens]`` like every label of a ``RoutingTrace``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from .errors import SettingError

SEGMENTS = ("prompt", "think", "answer")
Mode = Literal["thinking", "non-thinking"]
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def think_token_ids(tokenizer: Any) -> tuple[int, int]:
    """The ids of ``<think>`` and ``</think>``; SettingError when they are not single tokens of the vocabulary."""
    ids = []
    for text in (THINK_OPEN, THINK_CLOSE):
        tid = tokenizer.convert_tokens_to_ids(text)
        if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != text:
            raise SettingError(f"the tokenizer has no {text!r} token: thinking spans cannot be told apart. "
                               "Use a thinking chat model (Qwen3, DeepSeek-R1, ...) and its own tokenizer.")
        ids.append(int(tid))
    return ids[0], ids[1]


def supports_thinking(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template has the ``enable_thinking`` switch (as Qwen3's does)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    return "enable_thinking" in str(template)


def segment_labels(token_ids: np.ndarray, is_prompt: np.ndarray, open_id: int, close_id: int) -> np.ndarray:
    """``segment`` of each position of one sequence: ``[positions]`` ids and prompt flags -> ``[positions]`` str.

    The think state starts closed, opens at ``<think>`` and closes after ``</think>``; both markers belong to
    the span. Prompt positions are ``"prompt"`` whatever the state.
    """
    ids = np.asarray(token_ids)
    out = np.empty(len(ids), dtype=object)
    inside = False
    for i, tid in enumerate(ids):
        marker = tid in (open_id, close_id)
        if tid == open_id:
            inside = True
        segment = "think" if inside or marker else "answer"
        if tid == close_id:
            inside = False
        out[i] = "prompt" if is_prompt[i] else segment
    return out.astype(str)


def chat_prompts(tokenizer: Any, prompts: Sequence[str], *, enable_thinking: bool) -> list[str]:
    """Each prompt as one user turn through the tokenizer's chat template, with the generation prompt."""
    if not supports_thinking(tokenizer):
        raise SettingError("the tokenizer's chat template has no enable_thinking switch; thinking vs "
                           "non-thinking generation needs a template like Qwen3's.")
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                          add_generation_prompt=True, enable_thinking=enable_thinking)
            for p in prompts]  # fmt: skip


def generate_segments(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    enable_thinking: bool = True,
    max_new_tokens: int = 256,
    **generate_kwargs: Any,
) -> Any:
    """Generate an answer to each prompt (one user turn each) inside ``capture``; a labelled ``RoutingTrace``.

    Labels: ``segment`` (prompt / think / answer), ``mode`` (thinking / non-thinking), ``phase`` and ``prompt``
    (from capture). Prompts run one at a time (no padding: routing of 16-bit models depends on the batch, see
    ``metrics.routing_stability``). ``generate_kwargs`` go to ``model.generate`` (greedy by default).
    """
    import torch

    from .capture import capture
    from .models import to_input_device
    from .trace import RoutingTrace

    if not prompts:
        raise SettingError("generate_segments needs at least one prompt.")
    open_id, close_id = think_token_ids(tokenizer)
    texts = chat_prompts(tokenizer, prompts, enable_thinking=enable_thinking)
    mode = "thinking" if enable_thinking else "non-thinking"
    kwargs = {"do_sample": False, "max_new_tokens": max_new_tokens, **generate_kwargs}
    if tokenizer.pad_token_id is not None:
        kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    traces = []
    for i, text in enumerate(texts):
        batch = to_input_device(model, tokenizer([text], return_tensors="pt", add_special_tokens=False))
        with torch.inference_mode(), capture(model) as rec:
            model.generate(**batch, **kwargs)
        trace = rec.trace()
        is_prompt = trace.label("phase") == "prefill"
        segment = segment_labels(trace.token_ids, is_prompt, open_id, close_id)
        traces.append(trace.with_labels(segment=segment, mode=np.full(trace.num_tokens, mode),
                                        prompt_index=np.full(trace.num_tokens, i)))
    out = RoutingTrace.concat(traces) if len(traces) > 1 else traces[0]
    # one document per prompt: doc ids made distinct across the separate generate calls
    return _distinct_docs(out, np.concatenate([np.full(t.num_tokens, i) for i, t in enumerate(traces)]))


def _distinct_docs(trace: Any, call: np.ndarray) -> Any:
    from dataclasses import replace

    pairs = np.stack([call, trace.doc_ids]).T
    _, doc = np.unique(pairs, axis=0, return_inverse=True)
    return replace(trace, doc_ids=doc.reshape(-1).astype(np.int64))


def combine_modes(thinking: Any, non_thinking: Any) -> Any:
    """Two ``generate_segments`` traces (one per mode) as one, with distinct documents."""
    from .trace import RoutingTrace

    both = RoutingTrace.concat([thinking, non_thinking])
    call = np.concatenate([np.zeros(thinking.num_tokens, int), np.ones(non_thinking.num_tokens, int)])
    return _distinct_docs(both, call)


def segment_counts(trace: Any) -> pd.DataFrame:
    """Tokens per (mode, phase, segment): the sizes behind every contrast."""
    frame = pd.DataFrame({k: trace.label(k) for k in ("mode", "phase", "segment")})
    return frame.value_counts().rename("tokens").reset_index().sort_values(["mode", "phase", "segment"],
                                                                             ignore_index=True)


def thinking_contrasts(trace: Any, *, n_boot: int = 1000, seed: int = 0, top1: bool = False) -> pd.DataFrame:
    """Expert-usage contrasts (``metrics.contrast``: share differences with bootstrap CIs, per layer and expert):

    - ``think_vs_answer``: generated tokens inside vs outside thinking spans (thinking mode);
    - ``thinking_vs_non_thinking``: answer tokens of thinking mode vs those of non-thinking mode;
    - ``prefill_vs_decode``: prompt tokens vs generated tokens (both modes).

    A comparison whose sides lack tokens is left out. Returns one frame with a ``comparison`` column.
    """
    from .metrics import contrast

    labels = {k: trace.label(k) for k in ("mode", "segment", "phase")}
    frames = []
    specs = [
        ("think_vs_answer", labels["mode"] == "thinking", "segment", "think", "answer"),
        ("thinking_vs_non_thinking", labels["segment"] == "answer", "mode", "thinking", "non-thinking"),
        ("prefill_vs_decode", np.ones(trace.num_tokens, bool), "phase", "prefill", "decode"),
    ]
    for name, mask, label, a, b in specs:
        values = labels[label][mask]
        if not ((values == a).any() and (values == b).any()):
            continue
        out = contrast(trace.select(mask), label, a, b, n_boot=n_boot, seed=seed, top1=top1)
        frames.append(out.assign(comparison=name))
    if not frames:
        raise SettingError("thinking_contrasts: no comparison has tokens on both sides (no think span, "
                           "no answer, or one mode only).")
    return pd.concat(frames, ignore_index=True)
