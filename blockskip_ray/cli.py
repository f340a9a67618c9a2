"""The `blockskip` command line: a thin dispatcher over `blockskip_ray.commands`."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each command lives in its own module with `register(subparsers)`; imported lazily so `--help` stays fast.
COMMANDS = [
    "init_model",
    "train",
    "run",
    "status",
    "demo",
    "submit",
    "select",
    "eval",
    "precompute",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockskip",
        description="DiT-BlockSkip personalization of diffusion transformers (FLUX.1, SANA) on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"blockskip_ray.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"blockskip {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
