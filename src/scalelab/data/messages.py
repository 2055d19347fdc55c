"""Turning a low-level exception into the short, single-line reason a DataError quotes."""

from __future__ import annotations


def brief(exc: BaseException, limit: int = 200) -> str:
    """``"Type: message"`` on one line (tarfile errors can span several), cut to ``limit`` characters.

    Example:
        >>> brief(ValueError("bad\\n  thing"))
        'ValueError: bad thing'
    """
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
