"""Option-value parsers shared by several commands."""

from __future__ import annotations

import click


def size_or_auto(value: str, name: str) -> int | str:
    """``"auto"`` or a positive integer option value (``--tile``, ``--batch``)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected 'auto' or an integer", param_hint=name) from None


def split_csv(value: str | None) -> tuple[str, ...] | None:
    """``"a, b"`` -> ``("a", "b")``; None stays None (option not given)."""
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())
