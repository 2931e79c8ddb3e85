"""Wrapping a Megatron function where it is looked up, once, and restoring it exactly;
and saying a thing once per process."""

from __future__ import annotations

import threading
import warnings

_ORIGINAL = "_tofu_hook_original"


def wrap(module, name: str, make):
    """Replace ``module.name`` by ``make(original)`` unless already wrapped; returns the
    function now in place (None if ``module`` has no such attribute)."""
    fn = getattr(module, name, None)
    if fn is None or hasattr(fn, _ORIGINAL):
        return fn
    wrapper = make(fn)
    setattr(wrapper, _ORIGINAL, fn)
    setattr(module, name, wrapper)
    return wrapper


def original(fn):
    """The function ``fn`` wraps, or ``fn`` itself."""
    return getattr(fn, _ORIGINAL, fn)


def unwrap(module, name: str) -> None:
    """Put back what ``wrap`` replaced (a no-op where nothing is wrapped)."""
    fn = getattr(module, name, None)
    if fn is not None and hasattr(fn, _ORIGINAL):
        setattr(module, name, getattr(fn, _ORIGINAL))


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
