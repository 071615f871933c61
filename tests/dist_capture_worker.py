"""Run by tests/test_distributed.py under torchrun: each rank captures its shards of the same corpus."""

import sys

import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import moe_routing as mr
from conftest import make_qwen3_moe, make_tokenizer
from test_pipeline import TEXTS

dist.init_process_group("gloo")
model, tok = make_qwen3_moe(), make_tokenizer()
mr.capture_corpus(model, tok, TEXTS, sys.argv[1], batch_size=4, batches_per_shard=1, max_length=32,
                  progress=False)
dist.destroy_process_group()
