"""A real capture_corpus process for the kill / disk-full / lock tests.

python reliability_worker.py OUT [BATCH [GO]]: with GO, the model is built first, then ``GO.ready`` is written
and the capture starts once the file GO exists (so a test can start it at a chosen moment).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import moe_routing as mr
from conftest import make_qwen3_moe, make_tokenizer

TEXTS = [f"Sentence number {i} about foxes and dogs. " * (1 + i % 5) for i in range(600)]

if __name__ == "__main__":
    model, tok = make_qwen3_moe(), make_tokenizer()
    batch_size = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    if len(sys.argv) > 3:
        go = Path(sys.argv[3])
        Path(f"{go}.ready").write_text("ready")
        while not go.exists():
            time.sleep(0.002)
    try:
        mr.capture_corpus(model, tok, TEXTS, sys.argv[1], batch_size=batch_size, batches_per_shard=1,
                          max_length=48, progress=False)
    except mr.MoERoutingError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        sys.exit(3)
