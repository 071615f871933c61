"""Command line: ``moe-routing capture | info | demo | report``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _cmd_capture(args: argparse.Namespace) -> int:
    from .corpora import load_corpus
    from .models import load_model
    from .pipeline import capture_corpus

    corpus = load_corpus(args.corpus, split=args.split, langs=args.langs.split(",") if args.langs else None)
    print(f"[moe-routing] corpus {args.corpus!r}: {len(corpus)} texts", file=sys.stderr)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device_map=args.device,
                                  trust_remote_code=args.trust_remote_code, revision=args.revision)
    reader = capture_corpus(
        model, tokenizer, corpus, args.out, batch_size=args.batch_size, max_tokens=args.max_tokens,
        max_length=args.max_length, logits=args.logits, overwrite=args.overwrite,
    )
    print(reader)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .store import TraceReader

    reader = TraceReader(args.trace)
    print(reader)
    print(f"tokens: {reader.num_tokens}; labels: {', '.join(reader.label_names)}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo_pipeline import run_demo

    run_demo(model=args.model, out=args.out, report=not args.no_report)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import main as report_main

    return report_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-routing", description="Capture and analyse MoE routing.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("capture", help="capture routing for a corpus into a trace directory")
    c.add_argument("--model", required=True, help="HF id, local path, 'demo' or 'demo-untrained'")
    c.add_argument("--corpus", required=True, help="'demo', 'udhr', 'flores', 'hf:NAME[:CONFIG][:SPLIT]' or a file")
    c.add_argument("--out", required=True, help="output trace directory")
    c.add_argument("--split", default=None, help="corpus split (e.g. train, heldout)")
    c.add_argument("--langs", default=None, help="comma-separated language codes")
    c.add_argument("--logits", action="store_true", help="also store full router logits (float16)")
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--max-length", type=int, default=None, help="tokens per chunk (long texts are split)")
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--device", default=None, help="device_map for from_pretrained, e.g. auto, cuda:0, cpu")
    c.add_argument("--dtype", default="auto", help="auto, bfloat16, float16, float32")
    c.add_argument("--revision", default=None)
    c.add_argument("--trust-remote-code", action="store_true", help="run the repository's own code (only if trusted)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing trace in --out")
    c.set_defaults(func=_cmd_capture)

    i = sub.add_parser("info", help="describe a trace directory")
    i.add_argument("trace")
    i.set_defaults(func=_cmd_info)

    d = sub.add_parser("demo", help="the whole pipeline on the embedded demo (or MODEL)")
    d.add_argument("--model", default="demo")
    d.add_argument("--out", default="runs")
    d.add_argument("--no-report", action="store_true")
    d.set_defaults(func=_cmd_demo)

    r = sub.add_parser("report", help="execute the notebooks and render report/index.html")
    r.add_argument("rest", nargs=argparse.REMAINDER)
    r.set_defaults(func=_cmd_report)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from .errors import MoERoutingError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MoERoutingError as exc:
        print(f"moe-routing: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
