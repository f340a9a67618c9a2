"""KEY=VALUE overrides after the job file, with the command's options allowed anywhere among them.

argparse cannot mix a `nargs="*"` positional with options that come after it (`run JOB.yaml --store S a=1`
leaves `a=1` unrecognized), so the overrides are taken as REMAINDER and the options found in it are parsed here.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable


def take_options(ns: argparse.Namespace, remainder: list[str], options: dict[str, Callable[[str], Any] | None]
                 ) -> list[str]:
    """Set ns.<dest> for every `--opt VALUE` / `--opt=VALUE` / `--flag` (options[dest] is None) in remainder;
    return the rest (the overrides). Unknown options are errors."""
    out: list[str] = []
    items = iter(remainder)
    for item in items:
        if not item.startswith("-"):
            out.append(item)
            continue
        name, eq, value = item.partition("=")
        dest = name.lstrip("-").replace("-", "_")
        if not name.startswith("--") or dest not in options:
            raise ValueError(f"unknown option {name!r} (options: {', '.join('--' + o.replace('_', '-') for o in options)})")
        conv = options[dest]
        if conv is None:
            if eq:
                raise ValueError(f"option {name} takes no value")
            setattr(ns, dest, True)
            continue
        if not eq:
            value = next(items, None)
            if value is None:
                raise ValueError(f"option {name} needs a value")
        setattr(ns, dest, conv(value))
    return out
