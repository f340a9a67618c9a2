"""Identifier validation for everything that becomes part of a store path.

Subject ids, job ids and model keys are interpolated into object keys and local
paths (``subjects/{subject_id}/...``).  They are validated *before* any I/O so
that a hostile or malformed id can never escape the store root, name a hidden
file, or collide with the layout's own file names.
"""

from __future__ import annotations

import re

__all__ = ["ID_PATTERN", "validate_id", "is_valid_id"]

#: The design's id grammar (section 4): an alphanumeric first character, then up
#: to 127 of ``[A-Za-z0-9._-]``.  The first character rules out ``.``/``..`` and
#: hidden names; the character class rules out ``/``, ``\\``, NUL and spaces.
ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"

_ID_RE = re.compile(ID_PATTERN)


def is_valid_id(value: object) -> bool:
    """True when ``value`` is a str that :func:`validate_id` would accept."""
    if not isinstance(value, str):
        return False
    # fullmatch, not match: a trailing "\n" or "/x" must not slip through.
    if _ID_RE.fullmatch(value) is None:
        return False
    # The regex already excludes separators and NUL; these checks are belt and
    # braces so that a future edit of ID_PATTERN cannot silently weaken them.
    if any(c in value for c in ("/", "\\", "\x00")):
        return False
    # ".." inside an id (e.g. "a..b") cannot traverse on its own, but ids are
    # also joined by non-path code (URLs, Ray actor names); refusing it keeps
    # every consumer's reasoning simple.
    if ".." in value:
        return False
    return True


def validate_id(value: str, kind: str = "subject id") -> str:
    """Return ``value`` unchanged if it is a valid id, else raise ``ValueError``.

    ``kind`` names the id in the message ("subject id", "job id", ...), so a
    caller's error tells the user which input was wrong.
    """
    if not is_valid_id(value):
        raise ValueError(
            f"invalid {kind} {value!r}: must match {ID_PATTERN} "
            "(1-128 chars: letters, digits, '.', '_', '-'; first char alphanumeric; no '..')"
        )
    return value
