"""Side by side with the peers, in one process: plain, this project's capture, ``output_router_logits`` and
nnsight's saved router outputs, for prefill and decode, on the same model and inputs.

Prints, per method, its time / plain (interleaved rounds, medians; ``_timing.py``) and whether it got the routing
exactly: expert ids and weights compared with what the experts modules were run with (a forward pre-hook on every
experts module records the truth in a separate, untimed run). ``output_router_logits`` returns raw router logits
only; its ids and weights are the family's own selection rule replayed on them (``readings.RULES``).
nnsight (the optional ``peers`` extra: ``pip install 'moe-routing[peers]'``) is skipped with a message when it is
absent. nnterp 1.3.0 needs nnsight 0.7.x and does not import with 0.8.x, so it is not measured here.

    python benchmarks/peers.py [--rounds 9] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import warnings
from collections.abc import Callable
from typing import Any

import torch

import moe_routing as mr
from _timing import interleave, median_ms, ratios
from capture_overhead import build
from moe_routing.adapters import find_moe_layers, resolve_adapter
from moe_routing.readings import RULES

Routing = list[tuple[torch.Tensor, torch.Tensor]]  # per experts call (layer-major within a forward): ids, weights


def truth(model: Any, run: Callable[[], object]) -> Routing:
    """(ids [T, k], weights [T, k]) of every experts call of ``run``, in call order, from the experts' own inputs."""
    out: Routing = []
    layers = find_moe_layers(model, resolve_adapter(model))
    hooks = [m.module.register_forward_pre_hook(lambda mod, args: out.append((args[1].clone(), args[2].clone())))
             for m in layers]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return out


def per_forward(routing: Routing, n_layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Experts calls grouped by forward: ids/weights ``[T, layers, k]`` per forward."""
    return [(torch.stack([routing[i + j][0] for j in range(n_layers)], dim=1),
             torch.stack([routing[i + j][1] for j in range(n_layers)], dim=1))
            for i in range(0, len(routing), n_layers)]


def same(got: list[tuple[torch.Tensor, torch.Tensor]], want: list[tuple[torch.Tensor, torch.Tensor]],
         keep: list[torch.Tensor]) -> bool:
    """Equal ids and weights (bit for bit, weights compared in float32) on the real tokens of every forward."""
    if len(got) != len(want):
        return False
    for (gi, gw), (wi, ww), k in zip(got, want, keep, strict=True):
        if gi.shape != wi.shape or not torch.equal(gi[k].long(), wi[k].long()):
            return False
        if not torch.equal(gw[k].float(), ww[k].float()):
            return False
    return True


def replay(logits: tuple[torch.Tensor, ...], model: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """ids/weights ``[T, layers, k]`` from per-layer router logits with the family's rule (one forward)."""
    reading = RULES[model.config.model_type]
    routers = [m.router for m in find_moe_layers(model, resolve_adapter(model))]
    pairs = [reading.function(lg, reading.params(r)) for lg, r in zip(logits, routers, strict=True)]
    return [(torch.stack([p[0] for p in pairs], dim=1), torch.stack([p[1] for p in pairs], dim=1))]


def trace_routing(trace: mr.RoutingTrace, want: list[tuple[torch.Tensor, torch.Tensor]],
                  keep: list[torch.Tensor]) -> bool:
    """Whether a RoutingTrace holds exactly the real tokens' routing of ``want`` (in the same token order)."""
    ids = torch.cat([w[0][k] for w, k in zip(want, keep, strict=True)])
    weights = torch.cat([w[1][k] for w, k in zip(want, keep, strict=True)])
    return ids.shape == trace.expert_ids.shape and torch.equal(torch.from_numpy(trace.expert_ids).long(),
                                                                  ids.long()) and \
        torch.equal(torch.from_numpy(trace.weights), weights.float())


def report(variants: dict[str, Any], r: dict[str, float], exact: dict[str, bool], want: dict[str, Any],
           keep: list[torch.Tensor]) -> None:
    """One line per method: time / plain, routing exact, and whether its forward routed as the plain one did."""
    for name in variants:
        as_plain = same(want[name], want["plain"], keep)
        print(f"  {name:<22} {r[name]:.3f}x   routing exact: {exact[name]!s:<5}   "
              f"same forward as plain: {as_plain}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256, help="prefill tokens per row")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import nnsight
    except ImportError:
        nnsight = None
        print("nnsight is not installed: its rows are skipped (pip install 'moe-routing[peers]').")
    model = build(4, 256, 16, 4)
    n_layers = model.config.num_hidden_layers
    print(f"{datetime.date.today()} on {platform.processor() or 'CPU'}, threads={args.threads}; tiny qwen3_moe "
          f"({n_layers} layers, 16 experts, top-4); nnsight {getattr(nnsight, '__version__', 'absent')}; "
          f"rounds={args.rounds}", flush=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.tokens), generator=g)
    mask = torch.ones_like(ids)
    if args.batch > 1:
        mask[1, : args.tokens // 4] = 0
    nn_model = None
    if nnsight is not None:  # ids are passed in, so a one-word tokenizer satisfies the wrapper (no download)
        from tokenizers import Tokenizer, models
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                      pad_token="<unk>")
        nn_model = nnsight.TransformersModel(model, tokenizer=tok)
        warnings.filterwarnings("ignore", message=".*was never reached.*")  # the open tracer.all() loop's end
    gates = [f"model.layers.{i}.mlp.gate" for i in range(n_layers)]

    def envoy(path: str) -> Any:
        obj = nn_model
        for part in path.split("."):
            obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
        return obj

    # ---- prefill
    results: dict[str, Any] = {}

    def plain() -> None:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    def captured() -> None:
        with torch.inference_mode(), mr.capture(model) as rec:
            model(input_ids=ids, attention_mask=mask)
        results["capture"] = rec.trace()

    def router_logits() -> None:
        with torch.inference_mode():
            results["output_router_logits"] = model(input_ids=ids, attention_mask=mask,
                                                     output_router_logits=True).router_logits

    def with_nnsight() -> None:
        with torch.inference_mode(), nn_model.trace(input_ids=ids, attention_mask=mask):
            results["nnsight"] = [envoy(p).output.save() for p in gates]  # the block's names do not leave it

    variants: dict[str, Callable[[], None]] = {"plain": plain, "capture": captured,
                                               "output_router_logits": router_logits}
    if nn_model is not None:
        variants["nnsight"] = with_nnsight
    keep = [mask.reshape(-1).bool()]
    with torch.inference_mode():  # untimed runs with the truth hooks on: each method against its own forward
        want = {name: per_forward(truth(model, fn), n_layers) for name, fn in variants.items()}
    exact = {"plain": True, "capture": trace_routing(results["capture"], want["capture"], keep),
             "output_router_logits": same(replay(tuple(results["output_router_logits"]), model),
                                          want["output_router_logits"], keep)}
    if nn_model is not None:
        out = results["nnsight"]  # per layer: (router_logits, weights, ids)
        got = [(torch.stack([o[2] for o in out], dim=1), torch.stack([o[1] for o in out], dim=1))]
        exact["nnsight"] = same(got, want["nnsight"], keep)
    t = interleave(variants, args.rounds)
    r = ratios(t, "plain")
    print(f"prefill [{args.batch} x {args.tokens}, row 1 left-padded]: plain {median_ms(t['plain']):.1f} ms")
    report(variants, r, exact, want, keep)

    # ---- decode
    short, short_mask = ids[:, : args.prompt_tokens], torch.ones_like(ids[:, : args.prompt_tokens])
    gen_kw = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
              "pad_token_id": 0}

    def gen_plain() -> None:
        with torch.inference_mode():
            model.generate(short, attention_mask=short_mask, **gen_kw)

    def gen_captured() -> None:
        with torch.inference_mode(), mr.capture(model) as rec:
            model.generate(short, attention_mask=short_mask, **gen_kw)
        results["capture"] = rec.trace()

    def gen_router_logits() -> None:  # generate() hands router logits back only per step of a custom loop
        with torch.inference_mode():
            out = model.generate(short, attention_mask=short_mask, output_router_logits=True,
                                 return_dict_in_generate=True, **gen_kw)
        results["output_router_logits"] = out

    def gen_nnsight() -> None:
        with torch.inference_mode(), nn_model.generate(short, attention_mask=short_mask, **gen_kw) as tracer:
            results["nnsight"] = list().save()
            for _ in tracer.all():
                results["nnsight"].append([envoy(p).output for p in gates])

    variants = {"plain": gen_plain, "capture": gen_captured}
    if nn_model is not None:
        variants["nnsight"] = gen_nnsight
    with torch.inference_mode():
        want = {name: per_forward(truth(model, fn), n_layers) for name, fn in variants.items()}
    keep = [torch.ones(w[0].shape[0], dtype=torch.bool) for w in want["plain"]]
    exact = {"plain": True, "capture": trace_routing(results["capture"], want["capture"], keep)}
    if nn_model is not None:
        steps = results["nnsight"]
        got = [(torch.stack([o[2] for o in s], dim=1), torch.stack([o[1] for o in s], dim=1)) for s in steps]
        exact["nnsight"] = same(got, want["nnsight"], keep)
    t = interleave(variants, max(5, args.rounds // 2))
    r = ratios(t, "plain")
    print(f"decode (generate {args.batch} x {args.prompt_tokens} prompt + {args.new_tokens} new): plain "
          f"{median_ms(t['plain']):.1f} ms")
    report(variants, r, exact, want, keep)
    print("  output_router_logits   n/a      generate() does not return per-step router logits")


if __name__ == "__main__":
    main()
