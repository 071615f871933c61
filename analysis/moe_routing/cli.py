"""Command line: ``moe-routing capture | info | demo | report`` (``atlas`` and ``lab`` join in ``build_parser``).

Every error a user can cause ends the command with exit status 2 and one line ``moe-routing: error: ...`` on
stderr (no traceback); options are checked before any corpus or model is loaded. A notebook that fails makes
``demo`` and ``report`` exit with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import MoERoutingError, UsageError
from .models import DEVICE_MAPS, check_device  # noqa: F401  (check_device: public here before models had it)

#: dtypes the capture command accepts (``load_model`` aliases included); anything else is refused up front.
DTYPES = ("auto", "bfloat16", "float16", "float32", "bf16", "fp16", "fp32")
class Parser(argparse.ArgumentParser):
    """argparse with the project's error line: the usage, then ``moe-routing: error: ...``, exit status 2."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        self.exit(2, f"moe-routing: error: {message}\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (``--batch-size 0`` or ``--max-tokens -5`` are refused)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _cmd_capture(args: argparse.Namespace) -> int:
    from .corpora import check_label_columns, load_corpus

    check_device(args.device, option="--device")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a directory for the trace.")
    langs = [x for x in args.langs.split(",") if x.strip()] if args.langs else None
    corpus = load_corpus(args.corpus, split=args.split, langs=langs, text_column=args.text_column)
    labels = check_label_columns(corpus, args.label)
    print(f"[moe-routing] corpus {args.corpus!r}: {len(corpus)} texts; labels {', '.join(labels) or 'none'}",
          file=sys.stderr)

    from .models import load_model
    from .pipeline import capture_corpus

    model, tokenizer = load_model(args.model, dtype=args.dtype, device_map=args.device,
                                  trust_remote_code=args.trust_remote_code, revision=args.revision)
    reader = capture_corpus(
        model, tokenizer, corpus, args.out, batch_size=args.batch_size, max_tokens=args.max_tokens,
        max_length=args.max_length, logits=args.logits, overwrite=args.overwrite, labels=labels,
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
    """Traces (cached), then the project's notebooks on them; 1 when a notebook failed."""
    from .demo_pipeline import demo_parameters, run_demo
    from .report import build_report, find_notebooks, parse_params, project_notebooks, summarize

    check_device(args.device, option="--device")
    params = parse_params(args.param)
    notebooks = Path(args.notebooks) if args.notebooks else project_notebooks()
    if not args.no_report:
        find_notebooks(notebooks, args.only)  # a wrong --notebooks / --only fails before the captures
    langs = [x for x in args.langs.split(",") if x.strip()] if args.langs else None
    run_demo(model=args.model, out=args.out, report=False, device_map=args.device, dtype=args.dtype,
             corpus=args.corpus, langs=langs)
    if args.no_report:
        return 0
    parameters = {**demo_parameters(args.model, args.out, device_map=args.device, dtype=args.dtype,
                                    corpus=args.corpus, langs=langs), **params}
    index = build_report(notebooks, args.report_dir, parameters=parameters, only=args.only)
    return summarize(index)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="moe-routing", description="Capture and analyse MoE routing.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("capture", help="capture routing for a corpus into a trace directory")
    c.add_argument("--model", required=True, help="HF id, local path, 'demo' or 'demo-untrained'")
    c.add_argument("--corpus", required=True, help="'demo', 'udhr', 'flores', 'hf:NAME[:CONFIG][:SPLIT]' or a file")
    c.add_argument("--out", required=True, help="output trace directory")
    c.add_argument("--split", default=None, help="corpus split (e.g. train, heldout)")
    c.add_argument("--langs", default=None, help="comma-separated language codes")
    c.add_argument("--text-column", default="text", help="column holding the text in a table file or hub dataset")
    c.add_argument("--label", action="append", default=None, metavar="NAME",
                   help="corpus column to keep as a label (repeatable; default: every column but the text)")
    c.add_argument("--logits", action="store_true", help="also store full router logits (float16)")
    c.add_argument("--max-tokens", type=positive_int, default=None, help="stop after this many real tokens")
    c.add_argument("--max-length", type=positive_int, default=None, help="tokens per chunk (long texts are split)")
    c.add_argument("--batch-size", type=positive_int, default=8)
    c.add_argument("--device", default=None,
                   help="device_map: auto, cuda, cuda:N, mps, cpu (default: auto with a GPU present, else cpu)")
    c.add_argument("--dtype", default="auto", choices=DTYPES, metavar="{auto,bfloat16,float16,float32}",
                   help="weights dtype (default: auto, the checkpoint's)")
    c.add_argument("--revision", default=None)
    c.add_argument("--trust-remote-code", action="store_true", help="run the repository's own code (only if trusted)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing trace in --out")
    c.set_defaults(func=_cmd_capture)

    i = sub.add_parser("info", help="describe a trace directory")
    i.add_argument("trace")
    i.set_defaults(func=_cmd_info)

    d = sub.add_parser("demo", help="the whole pipeline on the embedded demo (or MODEL); exit 1 if a notebook fails")
    d.add_argument("--model", default="demo")
    d.add_argument("--out", default="runs", help="trace directories (default: ./runs)")
    d.add_argument("--report-dir", default="report", help="where the report goes (default: ./report)")
    d.add_argument("--notebooks", default=None, help="notebook folder (default: the project's notebooks/)")
    d.add_argument("--only", action="append", default=None, metavar="NN|NAME", help="run only these notebooks")
    d.add_argument("--param", "-p", action="append", default=None, metavar="KEY=VALUE",
                   help="extra notebook parameter (repeatable)")
    d.add_argument("--device", default=None,
                   help="device_map: auto, cuda, cuda:N, mps, cpu (default: auto with a GPU present, else cpu)")
    d.add_argument("--dtype", default="auto", choices=DTYPES, metavar="{auto,bfloat16,float16,float32}",
                   help="weights dtype (default: auto, the checkpoint's)")
    d.add_argument("--corpus", default=None, choices=("demo", "flores", "udhr"),
                   help="corpus of a real model (default: flores when reachable, else the offline demo corpus)")
    d.add_argument("--langs", default=None, help="comma-separated languages (default: all of the corpus's)")
    d.add_argument("--no-report", action="store_true")
    d.set_defaults(func=_cmd_demo)

    r = sub.add_parser("report", help="execute the notebooks and render report/index.html; exit 1 if one fails")
    from .report import add_arguments

    add_arguments(r)
    r.set_defaults(func=_cmd_report)

    from .atlas import add_arguments as atlas_arguments  # the expert atlas (static HTML)

    atlas_arguments(sub.add_parser("atlas", help="static offline HTML atlas: one page per (layer, expert)"))
    lb = sub.add_parser("lab", help="JupyterLab on the notebooks (.py files open as notebooks)")
    lb.add_argument("--notebooks", default=None, help="notebook folder (default: the project's notebooks/)")
    lb.add_argument("extra", nargs=argparse.REMAINDER, help="options passed on to jupyter lab")
    from .lab import run as lab_run

    lb.set_defaults(func=lab_run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (MoERoutingError, OSError) as exc:
        print(f"moe-routing: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
