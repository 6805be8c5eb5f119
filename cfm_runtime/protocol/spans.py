"""Which layers a center serves by default, and span arguments as users write them."""

from __future__ import annotations

from ..errors import CfmError


def default_span(n_layers: int) -> tuple[int, int]:
    """The dense middle: the edge keeps at least 2 layers at each end (30 layers -> 2:28)."""
    keep = 2 if n_layers >= 8 else 1 if n_layers >= 3 else 0
    return keep, n_layers - keep


def parse_span(text: str | None, n_layers: int) -> tuple[int, int]:
    """'a:b' -> (a, b) within [0, n_layers]; None -> default_span."""
    if not text:
        return default_span(n_layers)
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise CfmError(f"--layers {text!r}: write the span as START:END, e.g. 2:28") from None
    if not 0 <= a < b <= n_layers:
        raise CfmError(f"--layers {text}: need 0 <= START < END <= {n_layers} (the model has {n_layers} layers)")
    return a, b
