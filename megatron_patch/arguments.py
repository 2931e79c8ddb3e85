"""``--loss-type {cross_entropy,tofu} --tofu-gamma --tofu-beta --tofu-backend --tofu-fused-linear
--tofu-chunk-size --[no-]tofu-skip-masked``.

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
import weakref

from tofu_kernels.params import BACKENDS, DEFAULT_BETA, DEFAULT_GAMMA, beta_error, gamma_error
from tofu_kernels.patching import original, replace, restore

from .once import first_time, warn_once
from .patch import LOSS_TYPES, apply
from .reporting import CE_KEY

# Modules that call parse_args through a module-level name (imported there by name in
# some Megatron-LM versions); megatron.training.arguments itself is handled first.
_PARSE_ARGS_USERS = ("megatron.training.initialize", "megatron.training.training")


def _number(rule):
    """Text -> float, checked by a validity rule of tofu_kernels.params (gamma_error, beta_error)."""

    def convert(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise ValueError(f"not a number: {text!r}") from None
        err = rule(v)
        if err:
            raise ValueError(err.replace(repr(v), text))
        return v

    return convert


def _one_of(choices: tuple[str, ...]):
    def convert(text: str) -> str:
        if text not in choices:
            raise ValueError(f"invalid choice: {text!r} (choose from {', '.join(choices)})")
        return text

    return convert


# Which --tofu-* flags a parse was given, per parsed namespace (kept beside it rather than
# in it: Megatron prints every attribute of its arguments).
_GIVEN: dict[int, set[str]] = {}


def _mark_given(namespace, dest: str) -> None:
    key = id(namespace)
    if key not in _GIVEN:
        _GIVEN[key] = set()
        weakref.finalize(namespace, _GIVEN.pop, key, None)
    _GIVEN[key].add(dest)


class _Checked(argparse.Action):
    """Stores the flag's value as ``convert`` makes it (``nargs=0``: ``const``) and notes that
    it was given. A bad value ends the program with one line naming the flag (exit status 2,
    as argparse's own errors), without the usage text argparse prints first: Megatron's runs
    to hundreds of lines above the one that matters."""

    def __init__(self, option_strings, dest, convert=None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.convert = convert

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in _RENAMED:
            warn_once(
                f"megatron_patch: {option_string} is deprecated, use {_RENAMED[option_string]} "
                "(the same setting; the old name goes in the next release)"
            )
        try:
            setattr(namespace, self.dest, self.const if self.nargs == 0 else self.convert(values))
        except ValueError as e:
            if not getattr(parser, "exit_on_error", True):  # the parser's owner handles errors
                raise argparse.ArgumentError(self, str(e)) from None
            parser.exit(2, f"{parser.prog}: error: argument {option_string}: {e}\n")
        _mark_given(namespace, self.dest)


# Old flag names, still accepted for one release with a deprecation warning
_RENAMED = {"--tofu-fused-output": "--tofu-fused-linear"}

# The TOFU settings' flags (apply_from_args warns when any is given without --loss-type tofu)
_SETTINGS = (
    "tofu_gamma",
    "tofu_beta",
    "tofu_backend",
    "tofu_fused_linear",
    "tofu_chunk_size",
    "tofu_skip_masked",
)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"not an integer: {text!r}") from None
    if v < 1:
        raise ValueError(f"must be a positive integer, got {text}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the TOFU flags (a no-op if they are already there). Returns the parser."""
    if any("--loss-type" in a.option_strings for a in parser._actions):
        return parser
    g = parser.add_argument_group("TOFU loss (tofu-kernels)")
    g.add_argument(
        "--loss-type",
        action=_Checked,
        convert=_one_of(LOSS_TYPES),
        default="cross_entropy",
        metavar="{" + ",".join(LOSS_TYPES) + "}",
        help="language-model loss: Megatron's cross entropy (default, untouched) "
        "or the Tempered Focal loss",
    )
    g.add_argument(
        "--tofu-gamma",
        action=_Checked,
        convert=_number(gamma_error),
        default=DEFAULT_GAMMA,
        help=f"TOFU focal exponent gamma >= 0 (default {DEFAULT_GAMMA})",
    )
    g.add_argument(
        "--tofu-beta",
        action=_Checked,
        convert=_number(beta_error),
        default=DEFAULT_BETA,
        help=f"TOFU softmax temperature beta > 0 (default {DEFAULT_BETA})",
    )
    g.add_argument(
        "--tofu-backend",
        action=_Checked,
        convert=_one_of(BACKENDS),
        default="auto",
        metavar="{" + ",".join(BACKENDS) + "}",
        help="kernel backend (default auto: the CUDA extension on a GPU it was built for, else Triton "
        "on a GPU, else the torch backend on the CPU)",
    )
    g.add_argument(
        "--tofu-fused-linear",
        "--tofu-fused-output",  # its old name (_RENAMED)
        action=_Checked,
        nargs=0,
        const=True,
        default=False,
        help="GPTModel / HybridModel output layer and TOFU loss as one step: the logits "
        "[s, b, V/tp] and their gradient are never built (recomputed in blocks)",
    )
    g.add_argument(
        "--tofu-chunk-size",
        action=_Checked,
        convert=_positive_int,
        default=None,
        metavar="TOKENS",
        help="with --tofu-fused-linear: tokens per logits block (default: 1/16 of the micro-batch's "
        "tokens, fewer where a CHUNK_BYTES logits block holds fewer; whole 64-token tiles: "
        "docs/megatron.md)",
    )
    g.add_argument(
        "--tofu-skip-masked",
        dest="tofu_skip_masked",
        action=_Checked,
        nargs=0,
        const=True,
        default=None,
        help="with --tofu-fused-linear: compute the output layer only for the tokens whose loss mask "
        "is 1 (one host sync per micro-batch; default: on with --sft, off otherwise)",
    )
    g.add_argument(
        "--no-tofu-skip-masked",
        dest="tofu_skip_masked",
        action=_Checked,
        nargs=0,
        const=False,
        help="compute the output layer for every token (the default without --sft)",
    )
    return parser


def skip_masked(args: argparse.Namespace) -> bool:
    """--tofu-skip-masked as given, else on with --sft (SFT masks its prompts) and off
    otherwise (pretraining masks almost nothing, and Megatron keeps its steps free of host
    syncs): docs/megatron.md."""
    given = getattr(args, "tofu_skip_masked", None)
    return bool(getattr(args, "sft", False)) if given is None else given


def apply_from_args(args: argparse.Namespace) -> None:
    """Apply (or, for cross_entropy, leave untouched) according to parsed arguments.

    Says on rank 0 what it did (one line, once per process), and warns (once) where a flag
    has no effect: ``--tofu-*`` without ``--loss-type tofu``, and Megatron's
    ``--cross-entropy-loss-fusion``, superseded by the TOFU loss; nothing is silently ignored.
    """
    given = [
        f"--{name.replace('_', '-')}" for name in _SETTINGS if name in _GIVEN.get(id(args), ())
    ]
    loss_type = getattr(args, "loss_type", "cross_entropy")
    if loss_type == "tofu":
        skip = skip_masked(args) and args.tofu_fused_linear
        apply(
            "tofu",
            args.tofu_gamma,
            args.tofu_beta,
            args.tofu_backend,
            fused_linear=args.tofu_fused_linear,
            chunk_size=args.tofu_chunk_size,
            skip_masked=skip,
        )
        if args.tofu_skip_masked and not args.tofu_fused_linear:
            warn_once(
                "megatron_patch: --tofu-skip-masked has no effect without --tofu-fused-linear (the "
                "unfused loss reads the logits the output layer already computed for every token)"
            )
        if getattr(args, "cross_entropy_loss_fusion", False):
            impl = getattr(args, "cross_entropy_fusion_impl", "native")
            warn_once(
                "megatron_patch: --loss-type tofu replaces Megatron's cross entropy, so "
                f"--cross-entropy-loss-fusion (--cross-entropy-fusion-impl {impl}) has no effect: "
                "the TOFU kernels are fused already"
            )
        what = (
            f"--loss-type tofu (gamma={args.tofu_gamma}, beta={args.tofu_beta}, "
            f"backend={args.tofu_backend}): LanguageModule.compute_language_model_loss is TOFU; "
            f"'{CE_KEY}' is reported beside 'lm loss'"
        )
        if args.tofu_fused_linear:
            what += "; --tofu-fused-linear: the output layer and the loss run as one step, without the logits"
            if skip:
                what += ", for the tokens whose loss mask is 1 (--tofu-skip-masked)"
    else:
        apply("cross_entropy")
        what = "--loss-type cross_entropy: Megatron's loss is untouched"
        if given:
            warn_once(
                f"megatron_patch: {' '.join(given)} given without --loss-type tofu: no effect, "
                "Megatron's cross entropy is used (add --loss-type tofu for the TOFU loss)"
            )
    if getattr(args, "rank", int(os.environ.get("RANK", "0"))) == 0 and first_time(what):
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

    replace(arguments, "add_megatron_arguments", make_add)
    original_parse = original(arguments, "parse_args")
    wrapped_parse = replace(arguments, "parse_args", make_parse)
    for mod_name in _PARSE_ARGS_USERS:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        if getattr(mod, "parse_args", None) is original_parse:  # imported by name there
            replace(mod, "parse_args", lambda _: wrapped_parse)


def remove_hooks() -> None:
    """Undo ``install_hooks`` (restores the original functions)."""
    for mod_name in ("megatron.training.arguments", *_PARSE_ARGS_USERS):
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name in ("add_megatron_arguments", "parse_args"):
            restore(mod, name)
