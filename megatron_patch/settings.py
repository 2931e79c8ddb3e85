"""What ``apply()`` set: the loss's settings, read by the patched loss and the fused output step.

The first loss call after ``apply()`` checks its inputs on the host (labels in range, the
shards), the later ones do not (no host sync per step): :func:`take_call_params` hands out
the checking settings once.
"""

from __future__ import annotations

import dataclasses
import threading

from tofu_kernels.params import TOFUParams


@dataclasses.dataclass(frozen=True)
class Applied:
    params: TOFUParams
    fused_linear: bool = False
    chunk_size: int | None = None  # None: fused_linear.fused_chunk_rows
    skip_masked: bool = False  # the fused step computes only the rows whose loss mask is 1


lock = threading.Lock()  # held by apply() / revert() while they change the settings and hooks
_applied: Applied | None = None
_unchecked: TOFUParams | None = None
_checked = False


def store(applied: Applied | None) -> None:
    """Set the settings (None: not applied); the next loss call checks its inputs again."""
    global _applied, _unchecked, _checked
    _applied = applied
    _unchecked = (
        None if applied is None else dataclasses.replace(applied.params, check_inputs=False)
    )
    _checked = False


def current() -> Applied | None:
    return _applied


def take_call_params() -> TOFUParams | None:
    """The settings for one loss call: the input-checking ones the first time after
    :func:`store`, the non-checking ones from then on (None while not applied)."""
    global _checked
    if _applied is None:
        return None
    params = _unchecked if _checked else _applied.params
    _checked = True
    return params
