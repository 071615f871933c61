"""Intervention overhead: a forward inside ``mr.intervene`` vs a plain forward (target <= 1.05x), prefill and decode.

Every MoE layer is intervened (the worst case), and ``intervene`` is entered for every forward call: "replay only"
(bias 0: the full router replay on every layer, routing unchanged -- the pure hook cost), reroute (router replay + ban), zero (experts pre-hook), force,
bias, and reroute restricted by a ``where`` mask. The edits that change routing also change which experts run,
so their ratio includes that (real) change of work. Runs are interleaved on one thread; the median of per-round
ratios is printed, because these machines are noisy.

    python benchmarks/intervention_overhead.py [--rounds 15] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moe_routing as mr


def build(layers: int, hidden: int, experts: int, top_k: int):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "qwen3_moe", vocab_size=4096, hidden_size=hidden, intermediate_size=2 * hidden,
        moe_intermediate_size=hidden // 2, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, num_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=2048,
    )
    cfg._experts_implementation = "grouped_mm"
    return AutoModelForCausalLM.from_config(cfg).eval()


def interleave(variants: dict, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
    return {k: statistics.median(a / b for a, b in zip(v, times[base], strict=True)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = build(args.layers, args.hidden, args.experts, args.top_k).to(args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (args.batch, args.seq), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    mask[1, : args.seq // 4] = 0  # some left padding, as in real batches
    layers = range(args.layers)
    where = torch.zeros(args.batch, args.seq, dtype=torch.bool)
    where[0] = True
    edits = {
        "replay only": {"bias": {la: {3: 0.0} for la in layers}},  # full router replay, routing unchanged
        "reroute": {"ablate": {la: [3] for la in layers}},
        "zero": {"ablate": {la: [3] for la in layers}, "mode": "zero"},
        "force": {"force": {la: [3] for la in layers}},
        "bias": {"bias": {la: {3: 0.5, 5: -0.5} for la in layers}},
        "reroute+where": {"ablate": {la: [3] for la in layers}, "where": where},
    }

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def prefill(edit: dict | None):
        def run():
            with torch.inference_mode():
                if edit is None:
                    model(input_ids=ids, attention_mask=mask)
                else:
                    with mr.intervene(model, **edit):
                        model(input_ids=ids, attention_mask=mask)
            sync()
        return run

    print(f"device {args.device}, {args.threads} thread(s); {args.layers} MoE layers, hidden {args.hidden}, "
          f"{args.experts} experts, top-{args.top_k}; batch {args.batch} x {args.seq}; every MoE layer intervened")
    times = interleave({"plain": prefill(None), **{k: prefill(v) for k, v in edits.items()}}, args.rounds)
    r = ratios(times, "plain")
    print(f"prefill: plain median {statistics.median(times['plain']) * 1e3:.1f} ms")
    for k in edits:
        print(f"  {k:14s} {r[k]:.3f}x plain  {'ok' if r[k] <= 1.05 else 'ABOVE 1.05x target'}")

    def decode(edit: dict | None):
        prompt = ids[:, :32]

        def run():
            kw = {"max_new_tokens": args.decode_steps, "min_new_tokens": args.decode_steps, "do_sample": False,
                  "pad_token_id": 0}
            with torch.inference_mode():
                if edit is None:
                    model.generate(prompt, **kw)
                else:
                    with mr.intervene(model, **{k: v for k, v in edit.items() if k != "where"}):
                        model.generate(prompt, **kw)
            sync()
        return run

    times = interleave({"plain": decode(None), "reroute": decode(edits["reroute"]), "zero": decode(edits["zero"])},
                       max(3, args.rounds // 3))
    r = ratios(times, "plain")
    print(f"generate ({args.decode_steps} decode steps, prompt 32): plain median "
          f"{statistics.median(times['plain']) * 1e3:.1f} ms")
    for k in ("reroute", "zero"):
        print(f"  {k:14s} {r[k]:.3f}x plain")


if __name__ == "__main__":
    main()
