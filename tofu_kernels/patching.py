"""The one way the glue replaces a framework's attribute, and puts it back exactly.

``replace(owner, name, make)`` sets ``owner.name`` to ``make(current)`` once and records, on
``owner`` itself, what it replaced; ``restore`` puts that back where ours is still in place.
``owner`` is a module, a class or an instance (an instance's own attribute shadows its
class's; restoring one that had none deletes it). Used by ``megatron_patch`` and
``tofu_kernels.hf``.
"""

from __future__ import annotations

from collections.abc import Callable

_RECORD = "_tofu_replaced"  # on the owner: {name: (ours, what it replaced or _ABSENT)}
_ABSENT = object()


def _record(owner) -> dict:
    return vars(owner).get(_RECORD, {})  # vars: a subclass does not inherit its parent's


def replace(owner, name: str, make: Callable):
    """Put ``make(current)`` in ``owner.name`` unless ours is there already; returns the
    attribute now in place (None where ``owner`` has no ``name``)."""
    record = _record(owner)
    if name in record:
        return record[name][0]
    current = getattr(owner, name, None)
    if current is None:
        return None
    ours = make(current)
    setattr(owner, _RECORD, {**record, name: (ours, vars(owner).get(name, _ABSENT))})
    setattr(owner, name, ours)
    return ours


def restore(owner, name: str) -> None:
    """Undo :func:`replace` of ``owner.name`` (a no-op where nothing is replaced). Where
    something was set over ours meanwhile (a framework's own wrapper), it stays."""
    record = dict(_record(owner))
    ours, replaced = record.pop(name, (None, None))
    if ours is None:
        return
    if vars(owner).get(name) is ours:
        if replaced is _ABSENT:
            delattr(owner, name)
        else:
            setattr(owner, name, replaced)
    if record:
        setattr(owner, _RECORD, record)
    else:
        delattr(owner, _RECORD)


def replaced(owner) -> tuple[str, ...]:
    """The names :func:`replace` holds on ``owner``."""
    return tuple(_record(owner))


def original(owner, name: str):
    """What ``owner.name`` was before :func:`replace` (its current value where not
    replaced; None where ``owner`` had it from its class only)."""
    record = _record(owner)
    if name not in record:
        return getattr(owner, name, None)
    replaced_value = record[name][1]
    return None if replaced_value is _ABSENT else replaced_value
