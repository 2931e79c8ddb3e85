"""Tensor validation of every entry point (written once)."""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_common(fn: str, named: dict[str, object], x_name: str, labels_shape_rule: str) -> None:
    """The rules every entry point shares, in one order: all tensors, the floating input's
    dtype, the labels' dtype, the labels' shape (the input's without its last dim), one
    device. ``named``: the arguments by name, the floating input ``x_name`` first and the
    labels last."""
    if not all(isinstance(t, torch.Tensor) for t in named.values()):
        names = list(named)
        listed = (
            " and ".join(names) if len(names) == 2 else ", ".join(names[:-1]) + " and " + names[-1]
        )
        raise TypeError(f"{fn}: {listed} must be torch.Tensor")
    x, labels = named[x_name], named["labels"]
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{fn}: {x_name} must be float32, bfloat16 or float16, got {x.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{fn}: labels must be int64 or int32, got {labels.dtype}")
    if x.dim() < 1 or x.shape[:-1] != labels.shape:
        raise ValueError(
            f"{fn}: labels must have the shape of {x_name} without its last {labels_shape_rule}: "
            f"{x_name} {tuple(x.shape)} vs labels {tuple(labels.shape)}"
        )
    if len({t.device for t in named.values()}) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in named.items())
        raise ValueError(f"{fn}: {where}: they must be on one device")


def check_tensors(logits: torch.Tensor, labels: torch.Tensor) -> None:
    """The logits and labels of :func:`tofu_kernels.tofu_loss` (and its vocab-parallel twin)."""
    _check_common("tofu_loss", {"logits": logits, "labels": labels}, "logits", "(vocab) dim")
    if logits.shape[-1] == 0:
        raise ValueError("tofu_loss: logits have an empty vocab dimension")


def check_linear_tensors(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    """The inputs of :func:`tofu_kernels.linear_tofu_loss` (and its vocab-parallel twin)."""
    _check_common(
        "linear_tofu_loss", {"hidden": hidden, "weight": weight, "labels": labels}, "hidden", "dim"
    )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"linear_tofu_loss: weight ({weight.dtype}) and hidden ({hidden.dtype}) must have one dtype "
            "(nothing is cast silently)"
        )
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(
            f"linear_tofu_loss: weight must be [V, D] with V > 0, got {tuple(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_tofu_loss: hidden must be [..., D] with D = weight.shape[1] = {weight.shape[1]}, "
            f"got {tuple(hidden.shape)}"
        )


def flat_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` as the kernels read them: one contiguous int64 row (copied only if needed)."""
    flat = labels.reshape(-1)
    if flat.dtype != torch.int64 or not flat.is_contiguous():
        flat = flat.to(torch.int64).contiguous()
    return flat


def host_checks_allowed(t: torch.Tensor) -> bool:
    """Host-synchronising checks only on real tensors in eager mode.

    Never under torch.compile, CUDA-graph capture, or on meta / fake tensors (which
    have no values to check).
    """
    from torch._subclasses.fake_tensor import is_fake

    if torch.compiler.is_compiling() or t.is_meta or is_fake(t):
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def check_label_range(labels: torch.Tensor, ignore_index: int, vocab_size: int) -> None:
    """Raise on labels outside [0, vocab_size) that are not ignore_index (one host sync).

    Where this check is skipped the kernels give NaN for such tokens instead.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    n_bad = int(bad.sum())
    if n_bad:
        first = labels[bad][:4].tolist()
        raise ValueError(
            f"tofu_loss: {n_bad} label(s) outside [0, {vocab_size}) and not "
            f"ignore_index={ignore_index}, e.g. {first}"
        )
