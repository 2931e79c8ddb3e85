"""``--loss-type {cross_entropy,tofu} --tofu-gamma --tofu-beta --tofu-backend``.

``add_arguments(parser)`` works as Megatron's ``extra_args_provider``.
``install_hooks()`` makes every Megatron-LM entry point accept the flags and apply the
patch from them, without touching the script: it wraps
``megatron.training.arguments.add_megatron_arguments`` (looked up through its module by
``parse_args``) to add the flags, and ``parse_args`` (in ``megatron.training.arguments``
and wherever it was imported by name) to call ``apply_from_args`` on the result.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import warnings

from tofu_kernels.params import BACKENDS, DEFAULT_BETA, DEFAULT_GAMMA, beta_error, gamma_error

from ._hooks import original, unwrap, wrap
from .patch import LOSS_TYPES, apply
from .reporting import CE_KEY

# Modules that call parse_args through a module-level name (imported there by name in
# some Megatron-LM versions); megatron.training.arguments itself is handled first.
_PARSE_ARGS_USERS = ("megatron.training.initialize", "megatron.training.training")


def _float_arg(rule, name: str):
    """argparse type from a validity rule of tofu_kernels.params (gamma_error, beta_error)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        err = rule(v)
        if err:
            raise argparse.ArgumentTypeError(err.replace(repr(v), text))
        return v

    parse.__name__ = name
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the TOFU flags (a no-op if they are already there). Returns the parser."""
    if any("--loss-type" in a.option_strings for a in parser._actions):
        return parser
    g = parser.add_argument_group("TOFU loss (tofu-kernels)")
    g.add_argument("--loss-type", choices=LOSS_TYPES, default="cross_entropy",
                   help="language-model loss: Megatron's cross entropy (default, untouched) "
                        "or the Tempered Focal loss")
    g.add_argument("--tofu-gamma", type=_float_arg(gamma_error, "gamma"), default=DEFAULT_GAMMA,
                   help=f"TOFU focal exponent gamma >= 0 (default {DEFAULT_GAMMA})")
    g.add_argument("--tofu-beta", type=_float_arg(beta_error, "beta"), default=DEFAULT_BETA,
                   help=f"TOFU softmax temperature beta > 0 (default {DEFAULT_BETA})")
    g.add_argument("--tofu-backend", choices=BACKENDS, default="auto",
                   help="kernel backend (default auto: CUDA extension, else Triton)")
    return parser


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Once per process. Megatron parses its arguments several times per run (in-process
    restart, validation, fault tolerance), and Python's own once-per-location rule resets
    whenever any import changes the warning filters (transformers' does)."""
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


def apply_from_args(args: argparse.Namespace) -> None:
    """Apply (or, for cross_entropy, leave untouched) according to parsed arguments.

    Says on rank 0 what it did (one line), and warns where a Megatron flag is
    superseded by the TOFU loss (``--cross-entropy-loss-fusion``), so nothing is
    silently ignored.
    """
    loss_type = getattr(args, "loss_type", "cross_entropy")
    if loss_type == "tofu":
        apply("tofu", args.tofu_gamma, args.tofu_beta, args.tofu_backend)
        if getattr(args, "cross_entropy_loss_fusion", False):
            impl = getattr(args, "cross_entropy_fusion_impl", "native")
            _warn_once(
                "megatron_patch: --loss-type tofu replaces Megatron's cross entropy, so "
                f"--cross-entropy-loss-fusion (--cross-entropy-fusion-impl {impl}) has no effect: "
                "the TOFU kernels are fused already"
            )
        what = (f"--loss-type tofu (gamma={args.tofu_gamma}, beta={args.tofu_beta}, "
                f"backend={args.tofu_backend}): LanguageModule.compute_language_model_loss is TOFU; "
                f"'{CE_KEY}' is reported beside 'lm loss'")
    else:
        apply("cross_entropy")
        what = "--loss-type cross_entropy: Megatron's loss is untouched"
    if getattr(args, "rank", int(os.environ.get("RANK", "0"))) == 0:
        print(f"megatron_patch: {what}", flush=True)


def install_hooks() -> None:
    """Let unmodified Megatron-LM scripts accept the flags and apply the patch."""
    try:
        arguments = importlib.import_module("megatron.training.arguments")
    except ImportError as e:
        raise ImportError(
            "megatron_patch: megatron.training.arguments not importable (megatron-core >= 0.17 "
            f"ships it; older versions need a Megatron-LM checkout on PYTHONPATH): {e}"
        ) from e
    if not hasattr(arguments, "parse_args"):
        raise ImportError("megatron_patch: megatron.training.arguments.parse_args not found")

    def make_add(orig):
        @functools.wraps(orig)
        def add_megatron_arguments(parser, *a, **k):
            return add_arguments(orig(parser, *a, **k))

        return add_megatron_arguments

    def make_parse(orig):
        @functools.wraps(orig)
        def parse_args(extra_args_provider=None, *a, **k):
            def provider(parser):
                # also covers Megatron-LM versions whose parse_args does not go through
                # add_megatron_arguments
                if extra_args_provider is not None:
                    parser = extra_args_provider(parser)
                return add_arguments(parser)

            args = orig(provider, *a, **k)
            apply_from_args(args)
            return args

        return parse_args

    wrap(arguments, "add_megatron_arguments", make_add)
    original_parse = original(arguments.parse_args)
    wrapped_parse = wrap(arguments, "parse_args", make_parse)
    for mod_name in _PARSE_ARGS_USERS:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        if getattr(mod, "parse_args", None) is original_parse:  # imported by name there
            mod.parse_args = wrapped_parse


def remove_hooks() -> None:
    """Undo ``install_hooks`` (restores the original functions)."""
    for mod_name in ("megatron.training.arguments", *_PARSE_ARGS_USERS):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name in ("add_megatron_arguments", "parse_args"):
            unwrap(mod, name)
