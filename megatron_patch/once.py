"""Saying a thing once per process."""

from __future__ import annotations

import threading
import warnings

_said: set[str] = set()
_lock = threading.Lock()


def first_time(key: str) -> bool:
    """True the first time ``key`` comes up in this process. Megatron parses its arguments
    several times per run (in-process restart, validation, fault tolerance) and calls the
    loss every step; Python's own once-per-location rule for warnings resets whenever an
    import changes the warning filters (transformers' does)."""
    with _lock:
        if key in _said:
            return False
        _said.add(key)
        return True


def warn_once(message: str, key: str | None = None) -> None:
    """``warnings.warn(message)`` the first time ``key`` (default: the message) comes up."""
    if first_time(message if key is None else key):
        warnings.warn(message, stacklevel=3)
