"""The loss's settings: defaults, the validity rules (written here and nowhere else), and
:class:`TOFUParams`, the one frozen object that carries every non-tensor setting from where it
is set to the kernels (docs/design.md section 5)."""

from __future__ import annotations

import math
import operator
from dataclasses import InitVar, dataclass

# The paper's defaults (docs/design.md section 1).
DEFAULT_GAMMA = 3.0
DEFAULT_BETA = 0.8
DEFAULT_IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "cuda", "triton", "torch")


def _finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _plain_number(value):
    """A one-element number a user may hand in for gamma or beta (a 0-dim tensor, a numpy
    scalar) as a Python float; anything else unchanged, for the rules to refuse by name."""
    if hasattr(value, "ndim") and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        item = value.item()
        return (
            float(item) if isinstance(item, (int, float)) and not isinstance(item, bool) else value
        )
    return value


def gamma_error(gamma) -> str | None:
    """Why ``gamma`` is not a valid focal exponent (a finite number >= 0), or None."""
    if not _finite_number(gamma) or gamma < 0.0:
        return f"gamma must be a finite number >= 0, got {gamma!r}"
    return None


def beta_error(beta) -> str | None:
    """Why ``beta`` is not a valid temperature (a finite number > 0), or None."""
    if not _finite_number(beta) or beta <= 0.0:
        return f"beta must be a finite number > 0, got {beta!r}"
    return None


def check_flag(value, name: str, who: str, optional: bool = False) -> None:
    """Raise unless ``value`` is a bool (or None where ``optional``): ``bool("no")`` is True,
    and a string or a number read as a flag would silently change the result or the path."""
    if not (isinstance(value, bool) or (optional and value is None)):
        allowed = "True, False or None" if optional else "True or False"
        raise TypeError(f"{who}: {name} must be {allowed}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class TOFUParams:
    """Every non-tensor argument of a loss call, validated once at construction (keywords
    only: ``TOFUParams(gamma=3.0, beta=0.8)``).

    ``check_inputs`` is the request; whether host-side checks actually run is decided
    once per call by the core (never under torch.compile or CUDA-graph capture).

    ``who`` and ``names`` only word the errors as the caller's user typed them (e.g.
    ``who="TOFUSFTTrainer", names={"gamma": "tofu_gamma"}``); they are not settings.
    """

    gamma: float = DEFAULT_GAMMA
    beta: float = DEFAULT_BETA
    ignore_index: int = DEFAULT_IGNORE_INDEX
    reduction: str = "mean"
    backend: str = "auto"
    inplace_backward: bool = False
    return_ce: bool = False
    return_metrics: bool = False  # per-token entropy and top-1 (records.TokenMetrics)
    check_inputs: bool = True
    grad_in_forward: bool | None = None  # None: wherever possible (core.py)
    who: InitVar[str] = "tofu_loss"
    names: InitVar[dict | None] = None

    def __post_init__(self, who: str, names: dict | None):
        def name(field: str) -> str:
            return (names or {}).get(field, field)

        object.__setattr__(self, "gamma", _plain_number(self.gamma))
        object.__setattr__(self, "beta", _plain_number(self.beta))
        for field, err in (("gamma", gamma_error(self.gamma)), ("beta", beta_error(self.beta))):
            if err:
                raise ValueError(f"{who}: {name(field)}{err[len(field) :]}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(
                f"{who}: {name('reduction')} must be one of {REDUCTIONS}, got {self.reduction!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"{who}: {name('backend')} must be one of {BACKENDS}, got {self.backend!r}"
            )
        try:
            ignore_index = operator.index(self.ignore_index)
        except TypeError:
            raise TypeError(
                f"{who}: {name('ignore_index')} must be an integer, got {self.ignore_index!r}"
            ) from None
        # Plain Python scalars from here on (numpy / tensor scalars would leak into kernels).
        object.__setattr__(self, "gamma", float(self.gamma))
        object.__setattr__(self, "beta", float(self.beta))
        object.__setattr__(self, "ignore_index", ignore_index)
        for field in (
            "inplace_backward",
            "return_ce",
            "return_metrics",
            "check_inputs",
            "grad_in_forward",
        ):
            check_flag(getattr(self, field), name(field), who, optional=field == "grad_in_forward")
