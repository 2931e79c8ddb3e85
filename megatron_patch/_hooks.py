"""Wrapping a Megatron function where it is looked up, once, and restoring it exactly."""

from __future__ import annotations

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
