"""Does sampled code parse? The quickstart's quality check for a model trained on Python source.

A sample continues a prompt such as ``"def "``; `first_function` cuts the first function out
of it (the ``def`` line and its body: every line up to the first non-blank line indented less
than the body), and `parse_rate` counts the functions that `ast.parse` accepts. A sample that
ends before its function does (no dedent after the body) counts as not parsed: the rate is the
share of samples that give one whole, valid function.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def first_function(text: str) -> str | None:
    """The first `def` of `text` with its body, dedented to column 0; None when the text has
    no `def` or ends inside the function.

    The signature ends at the first line that closes its brackets; the body's indent is the
    next non-blank line's, and the function ends before the first non-blank line indented
    less (a decorator or the next method end a method as a top-level statement ends a def).
    """
    lines = text.split("\n")
    start = next((i for i, ln in enumerate(lines) if ln.lstrip().startswith("def ")), None)
    if start is None:
        return None
    sig_end, depth = start, 0
    for sig_end in range(start, len(lines)):
        depth += sum(lines[sig_end].count(c) for c in "([{")
        depth -= sum(lines[sig_end].count(c) for c in ")]}")
        if depth <= 0:
            break
    base = _indent(lines[start])
    body = [i for i in range(sig_end + 1, len(lines)) if lines[i].strip()]
    if not body or _indent(lines[body[0]]) <= base:
        return None
    body_indent = _indent(lines[body[0]])
    end = next((i for i in body if _indent(lines[i]) < body_indent), None)
    if end is None:
        return None  # the sample stopped inside the body
    return "\n".join(ln[base:] for ln in lines[start:end])


def parses(source: str | None) -> bool:
    if source is None:
        return False
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):  # ValueError: null bytes
        return False
    return True


def parse_rate(samples: Iterable[str]) -> dict:
    """{'samples', 'complete' (a whole function came out), 'parsed', 'rate' (parsed / samples)}."""
    functions = [first_function(s) for s in samples]
    parsed = sum(parses(f) for f in functions)
    n = len(functions)
    return {
        "samples": n,
        "complete": sum(f is not None for f in functions),
        "parsed": parsed,
        "rate": parsed / n if n else 0.0,
    }
