"""generate() inside capture: every position of every returned sequence is recorded once (issue 14, item 5).

Each variant is checked against what generate() returned: the recorded token ids are the returned sequences
(prompt without padding, then every generated token but the last, which is never fed back), positions run
0..n-1 once per sequence, the ``prompt`` label links each sequence to its input row, and routing equals an
independent forward over the returned sequences (exact ids where generate's last forward *is* that forward).
Beam search is refused with a clear error.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_qwen3_moe
from moe_routing.capture import capture
from moe_routing.errors import UnsupportedGenerationError
from test_capture import n_hooks


@pytest.fixture(scope="module")
def model():
    return make_qwen3_moe(seed=0)


def left_padded(lengths=(6, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, 300, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


class Fed:
    """Counts the token rows the model's embedding really received (drafts included): an independent probe."""

    def __init__(self, model):
        self.rows = 0
        self.handle = model.get_input_embeddings().register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.rows += args[0].numel()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def generate(model, ids, mask, **kw):
    with torch.no_grad(), Fed(model) as fed, capture(model) as rec:
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, **kw)
    return rec.trace(), out, fed.rows


def check_against_sequences(trace, seqs, ids, mask, per_prompt=1):
    """One record per fed position of each returned row; ids/positions/phase/prompt follow the sequences."""
    width = ids.shape[1]
    docs = np.unique(trace.doc_ids)
    assert len(docs) == seqs.shape[0]
    for r, d in enumerate(docs):
        sel = trace.doc_ids == d
        p = r // per_prompt
        prompt = ids[p][mask[p].bool()].numpy()
        want = np.concatenate([prompt, seqs[r, width:-1].numpy()])
        np.testing.assert_array_equal(trace.positions[sel], np.arange(len(want)))
        np.testing.assert_array_equal(trace.token_ids[sel], want)
        np.testing.assert_array_equal(trace.labels["phase"][sel],
                                      np.where(np.arange(len(want)) < len(prompt), "prefill", "decode"))
        assert (trace.labels["prompt"][sel] == p).all()
    assert trace.num_tokens == sum(int(mask[r // per_prompt].sum()) + seqs.shape[1] - width - 1
                                   for r in range(seqs.shape[0]))


def independent_forward(model, seqs, ids, mask, per_prompt=1):
    """Routing of one plain forward over the returned sequences (the last token dropped: it was never fed)."""
    full = torch.cat([mask.repeat_interleave(per_prompt, 0),
                      torch.ones((seqs.shape[0], seqs.shape[1] - ids.shape[1]), dtype=mask.dtype)], dim=1)
    inputs, m = seqs[:, :-1], full[:, :-1]
    with torch.no_grad(), capture(model) as rec:
        model(input_ids=inputs, attention_mask=m, position_ids=(m.cumsum(1) - 1).clamp(min=0))
    return rec.trace()


def by_sequence(trace) -> np.ndarray:
    """Row order by (document, position): a trace lists generate's records in the order they were fed."""
    return np.lexsort((trace.positions, trace.doc_ids))


def assert_same_routing(trace, ref, exact_weights=False):
    a, b = by_sequence(trace), by_sequence(ref)
    np.testing.assert_array_equal(trace.token_ids[a], ref.token_ids[b])
    np.testing.assert_array_equal(trace.positions[a], ref.positions[b])
    np.testing.assert_array_equal(trace.expert_ids[a], ref.expert_ids[b])
    np.testing.assert_allclose(trace.weights[a], ref.weights[b], atol=0 if exact_weights else 1e-5)


def test_use_cache_false_records_each_position_once(model):
    ids, mask = left_padded()
    trace, seqs, fed = generate(model, ids, mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                use_cache=False)
    assert fed > trace.num_tokens  # every step re-ran the whole sequence
    check_against_sequences(trace, seqs, ids, mask)
    ref = independent_forward(model, seqs, ids, mask)
    assert_same_routing(trace, ref, exact_weights=True)  # the last no-cache step is that very forward


def test_cached_generate_equals_a_forward_over_the_returned_sequences(model):
    ids, mask = left_padded(seed=1)
    trace, seqs, fed = generate(model, ids, mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert fed == trace.num_tokens + int((mask == 0).sum())  # cached: every fed real token once
    check_against_sequences(trace, seqs, ids, mask)
    assert_same_routing(trace, independent_forward(model, seqs, ids, mask))


def test_num_return_sequences_are_linked_to_their_prompt(model):
    ids, mask = left_padded(seed=2)
    torch.manual_seed(0)
    trace, seqs, _ = generate(model, ids, mask, max_new_tokens=4, min_new_tokens=4, do_sample=True,
                              num_return_sequences=3)
    assert seqs.shape[0] == 6
    check_against_sequences(trace, seqs, ids, mask, per_prompt=3)
    np.testing.assert_array_equal(np.unique(trace.labels["prompt"]), [0, 1])
    assert_same_routing(trace, independent_forward(model, seqs, ids, mask, per_prompt=3))


def test_prompt_lookup_drops_rejected_drafts(model):
    ids = torch.tensor([[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7]])
    mask = torch.ones_like(ids)
    trace, seqs, fed = generate(model, ids, mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                prompt_lookup_num_tokens=3)
    assert fed > trace.num_tokens  # draft tokens were fed and rejected
    check_against_sequences(trace, seqs, ids, mask)
    assert_same_routing(trace, independent_forward(model, seqs, ids, mask))


def test_assisted_decoding_with_a_separate_assistant(model):
    ids, mask = left_padded(lengths=(7,), seed=3)
    assistant = make_qwen3_moe(seed=5)
    trace, seqs, fed = generate(model, ids, mask, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                assistant_model=assistant)
    assert fed > trace.num_tokens
    check_against_sequences(trace, seqs, ids, mask)
    assert_same_routing(trace, independent_forward(model, seqs, ids, mask))


def test_chunked_prefill_is_all_prefill(model):
    ids, mask = left_padded(lengths=(7, 7), seed=4)
    trace, seqs, _ = generate(model, ids, mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                              prefill_chunk_size=3)
    check_against_sequences(trace, seqs, ids, mask)  # the 2nd and 3rd prompt chunks are labelled prefill


def test_beam_search_is_refused_and_the_recipe_in_the_message_works(model):
    ids, mask = left_padded(seed=5)
    with pytest.raises(UnsupportedGenerationError, match=r"beam search \(num_beams=2\).*model\(input_ids=out"), \
            torch.no_grad(), capture(model):
        model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, max_new_tokens=3, num_beams=2)
    assert n_hooks(model) == 0 and "generate" not in vars(model)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, max_new_tokens=3,
                             min_new_tokens=3, num_beams=2, do_sample=False)
    trace = independent_forward(model, out, ids, mask)
    assert trace.num_tokens == int(mask.sum()) + 2 * 2
