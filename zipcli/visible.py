"""Text that came from a file, made safe to show: every control character is written out.

A head or class name, a file name or a metadata value can hold terminal escape sequences (which
retitle a window or clear a screen) or bidirectional overrides (which reorder what is read). Every
command and the model card show such text through ``visible``: ``\\x1b`` appears as the four
characters ``\\x1b``, never as an escape.
"""
from __future__ import annotations

import unicodedata

_BIDI = {0x200E, 0x200F, 0x061C, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}


def _written_out(ch: str) -> str:
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def visible(text: object) -> str:
    """``text`` with control characters (C0, DEL, C1, line and paragraph separators, bidirectional
    controls, lone surrogates from undecodable file names) written as ``\\xNN`` / ``\\uNNNN``;
    everything else, Unicode letters included, as is."""
    s = str(text)
    if s.isprintable():
        return s
    return "".join(_written_out(ch) if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ord(ch) in _BIDI
                   else ch for ch in s)


def visible_tree(value):
    """``value`` (JSON-like: dicts, lists, strings, numbers) with every string passed through
    ``visible``, keys included: for rendering a whole record that came from a file."""
    if isinstance(value, str):
        return visible(value)
    if isinstance(value, dict):
        return {visible_tree(k): visible_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [visible_tree(v) for v in value]
    return value
