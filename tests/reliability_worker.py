"""A real capture_corpus process for the kill / disk-full tests: python reliability_worker.py OUT."""

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import moe_routing as mr
from conftest import make_qwen3_moe, make_tokenizer

TEXTS = [f"Sentence number {i} about foxes and dogs. " * (1 + i % 5) for i in range(600)]

if __name__ == "__main__":
    model, tok = make_qwen3_moe(), make_tokenizer()
    try:
        mr.capture_corpus(model, tok, TEXTS, sys.argv[1], batch_size=4, batches_per_shard=1, max_length=48,
                          progress=False)
    except mr.MoERoutingError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        sys.exit(3)
