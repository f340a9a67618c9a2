"""The `blockskip` command line: a thin dispatcher over `blockskip_ray.commands`.

Start-up is kept under a second: `blockskip --help` imports no command module (the summaries below are
checked against the modules by a test), and `blockskip CMD ...` imports only CMD's module, whose heavy
imports (torch, peft, ray) happen inside its `run`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> one-line summary (the same text as the `help=` in the command's module; a test keeps them equal)
COMMANDS = {
    "init-model": "write a tiny random FLUX or SANA pipeline (no downloads)",
    "train": "train one subject's block-skipped LoRA on one device",
    "demo": "run the whole pipeline on the pretrained toy model with 3 held-out toy subjects (local Ray, CPU)",
    "estimate": "peak training memory and TFLOPs of one step at full scale, without weights",
    "select": "measure the skip table (ratio -> n*, m*) of a model with masking probes on Ray",
    "eval": "score an adapter: DINO, CLIP-I, CLIP-T against the subject's reference images",
    "precompute": "precompute the frozen model's features of a catalog into the store (Ray Data)",
    "run": "run a catalog job (validate, select, precompute, train, sample) on Ray",
    "status": "print a catalog job's status table",
    "jobs": "list the jobs in a store with their subject counts",
    "submit": "submit a catalog job to a remote Ray cluster (Ray job server)",
    "serve": "serve every trained adapter from one HTTP endpoint (Ray Serve)",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already states its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default in (None, False, argparse.SUPPRESS)
                or isinstance(action, argparse._HelpAction)):
            return text
        return f"{text} (default: %(default)s)"


def _module(command: str):
    return importlib.import_module(f"blockskip_ray.commands.{command.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, just that command is registered ("": none), the others listed by name."""
    parser = argparse.ArgumentParser(
        prog="blockskip", formatter_class=HelpFormatter,
        description="DiT-BlockSkip personalization of diffusion transformers (FLUX.1, SANA) on Ray.",
        epilog="Run `blockskip COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    real_add = sub.add_parser

    def add_parser(name, **kw):  # every command's options show their defaults
        kw.setdefault("formatter_class", HelpFormatter)
        return real_add(name, **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]
    for name, summary in COMMANDS.items():
        if only is None or name == only:
            _module(name).register(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def _auth_error(e: BaseException) -> str | None:
    """Ray's AuthenticationError (a long multi-line message) as one line with the fix; None for anything else."""
    if type(e).__name__ != "AuthenticationError" or not type(e).__module__.startswith("ray"):
        return None
    what = "was refused (wrong token)" if "failed" in str(e).split("\n", 1)[0].lower() else "needs a token"
    return (f"the Ray cluster {what}: export RAY_AUTH_TOKEN=<the cluster's token> (for the `ray` CLI also "
            "RAY_AUTH_MODE=token)")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(only if only in COMMANDS else "").parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"blockskip {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if (line := _auth_error(e)) is None:
            raise
        print(f"blockskip {args.command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
