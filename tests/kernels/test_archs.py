"""Which cards the CUDA extension's kernels run on, without a GPU: the architectures a build
records (setup.py), the rule that decides from them (extension.runs_on), and the dispatch on a
faked card's capability (backend="auto" picks CUDA only where the extension has a kernel image
for the card, else Triton; backend="cuda" refuses with what to rebuild).

The extension is replaced by a stand-in that holds the architectures under test, so these
run whether or not the extension is built; tests/kernels/test_cuda_ext.py checks the real
one's record against its binary.
"""

from __future__ import annotations

import runpy
import types

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import tofu_kernels as tk
from tests.support.checkout import ROOT
from tests.support.spies import DispatchSpy
from tofu_kernels import extension
from tofu_kernels.backends import get_backend

DEFAULT = "sm_80 sm_90 sm_100 compute_100"  # setup.py's default build (8.0;9.0;10.0+PTX)
HOPPER_ONLY = "sm_90"  # TORCH_CUDA_ARCH_LIST=9.0
REBUILD = "pip install --no-build-isolation ."


@pytest.fixture
def card(monkeypatch):
    """``card(capability, archs)``: CUDA device 0 reports ``capability`` (a list: devices 0, 1,
    ... report these) and the loaded extension holds ``archs``; nothing cached from another
    card. ``visible``: torch.cuda.is_available() says so too (not under FakeTensorMode, which
    would then start the CUDA runtime)."""

    def fake(capability, archs: str = DEFAULT, visible: bool = False):
        caps = capability if isinstance(capability, list) else [capability]
        stand_in = types.SimpleNamespace(ARCHS=archs, __file__="/site/tofu_kernels/_C.so")
        monkeypatch.setattr(extension, "EXTENSION", stand_in)
        monkeypatch.setattr(extension, "_ON_DEVICE", {})
        monkeypatch.setattr(
            torch.cuda,
            "get_device_capability",
            lambda device=None: caps[0 if device is None else int(device)],
        )
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        if visible:
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
            monkeypatch.setattr(torch.cuda, "device_count", lambda: len(caps))

    return fake


CUDA0 = torch.device("cuda", 0)

# (card, archs held) -> the backend "auto" picks, and the image its kernels come from
CARDS = {
    "A100 sm_80": ((8, 0), DEFAULT, "cuda", "through its sm_80 cubin"),
    "A40 sm_86": ((8, 6), DEFAULT, "cuda", "through its sm_80 cubin"),
    "H100 sm_90": ((9, 0), DEFAULT, "cuda", "through its sm_90 cubin"),
    "B200 sm_100": ((10, 0), DEFAULT, "cuda", "through its sm_100 cubin"),
    "B300 sm_103": ((10, 3), DEFAULT, "cuda", "through its sm_100 cubin"),
    "RTX 5090 sm_120": (
        (12, 0),
        DEFAULT,
        "cuda",
        "through its compute_100 PTX, which the driver compiles",
    ),
    "T4 sm_75": ((7, 5), DEFAULT, "triton", "no kernel image for capability 7.5"),
    "A100, a 9.0-only build": ((8, 0), HOPPER_ONLY, "triton", "no kernel image for capability 8.0"),
    "B200, a 9.0-only build": (
        (10, 0),
        HOPPER_ONLY,
        "triton",
        "no kernel image for capability 10.0",
    ),
}

# the TORCH_CUDA_ARCH_LIST the refusal proposes: the archs held, and the card
REBUILD_LISTS = {
    "T4 sm_75": "7.5;8.0;9.0;10.0+PTX",
    "A100, a 9.0-only build": "8.0;9.0",
    "B200, a 9.0-only build": "9.0;10.0",
}


@pytest.mark.parametrize("name", list(CARDS))
def test_auto_picks_cuda_only_where_the_extension_has_an_image(card, name):
    capability, archs, expect, why = CARDS[name]
    card(capability, archs)
    assert get_backend("auto", CUDA0).name == expect
    ok, reason = extension.runs_on_device(0)
    assert ok == (expect == "cuda") and why in reason, reason
    assert reason.startswith("cuda:0: "), reason
    if expect == "cuda":
        assert get_backend("cuda", CUDA0).name == "cuda"


@pytest.mark.parametrize("name", [n for n, c in CARDS.items() if c[2] == "triton"])
def test_backend_cuda_on_a_card_without_an_image_says_what_to_rebuild(card, name):
    """The error names the card's capability, the architectures held and the build that adds the card."""
    capability, archs, _, _ = CARDS[name]
    card(capability, archs)
    with pytest.raises(RuntimeError) as err:
        get_backend("cuda", CUDA0)
    msg = str(err.value)
    cap = f"{capability[0]}.{capability[1]}"
    assert msg.startswith(
        f"tofu_loss: backend 'cuda' is unavailable: cuda:0: the CUDA extension has no kernel "
        f"image for capability {cap}: it holds {archs} "
    ), msg
    assert msg.endswith(
        f'Rebuild it for this card: TORCH_CUDA_ARCH_LIST="{REBUILD_LISTS[name]}" {REBUILD}'
    ), msg


def test_device_without_index_is_the_current_device(card, monkeypatch):
    card([(9, 0), (7, 5)])
    assert get_backend("auto", torch.device("cuda")).name == "cuda"
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert get_backend("auto", torch.device("cuda")).name == "triton"
    assert get_backend("auto", torch.device("cuda", 0)).name == "cuda"


def test_the_answer_is_cached_per_device(card, monkeypatch):
    card([(9, 0), (7, 5)])
    asked = []
    real = torch.cuda.get_device_capability
    monkeypatch.setattr(
        torch.cuda,
        "get_device_capability",
        lambda device=None: asked.append(device) or real(device),
    )
    for _ in range(3):
        assert [get_backend("auto", torch.device("cuda", i)).name for i in (0, 1)] == [
            "cuda",
            "triton",
        ]
    assert asked == [0, 1]


@pytest.mark.parametrize(
    "capability,backend,op",
    [
        ((9, 0), "cuda", "row_stats"),
        ((12, 0), "cuda", "row_stats"),
        ((7, 5), "triton", "triton_row_stats"),
    ],
)
def test_tofu_loss_on_fake_cuda_tensors_runs_the_chosen_backends_ops(card, capability, backend, op):
    """The whole call on fake CUDA tensors (shapes only): "auto" reaches the ops of the backend
    the card allows."""
    card(capability)
    with FakeTensorMode():
        x = torch.empty(4, 8, device="cuda", requires_grad=True)
        labels = torch.zeros(4, dtype=torch.long, device="cuda")
        with DispatchSpy() as spy:
            loss = tk.tofu_loss(x, labels, grad_in_forward=False)
    assert loss.shape == () and loss.device.type == "cuda"
    assert spy.ours[0] == op, spy.ours
    assert all(o.startswith("triton_") == (backend == "triton") for o in spy.ours), spy.ours


def test_tofu_loss_backend_cuda_refused_on_fake_sm75_tensors(card):
    card((7, 5))
    with FakeTensorMode():
        x = torch.empty(4, 8, device="cuda")
        labels = torch.zeros(4, dtype=torch.long, device="cuda")
        with pytest.raises(
            RuntimeError,
            match=r"no kernel image for capability 7\.5: it holds sm_80 sm_90 sm_100 "
            r"compute_100 .*TORCH_CUDA_ARCH_LIST=\"7\.5;8\.0;9\.0;10\.0\+PTX\" pip "
            r"install --no-build-isolation \.",
        ):
            tk.tofu_loss(x, labels, backend="cuda")


def test_torch_compile_traces_the_dispatch_without_a_graph_break(card):
    """Under torch.compile the card's answer is a constant of the graph (fullgraph: no break)."""

    def f(x):
        return x + (1 if get_backend("auto", CUDA0).name == "cuda" else 2)

    for capability, expect in (((7, 5), 2.0), ((9, 0), 1.0)):
        card(capability)
        torch._dynamo.reset()
        assert (
            torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2)).tolist()
            == [expect] * 2
        )
    torch._dynamo.reset()


# ------------------------------------------------------------ the rule (a pure function)


@pytest.mark.parametrize(
    "capability,archs,image",
    [
        ((8, 0), ["sm_80"], "sm_80 cubin"),
        ((8, 9), ["sm_80", "sm_86"], "sm_86 cubin"),  # the closest minor below
        ((9, 0), ["sm_90", "compute_90"], "sm_90 cubin"),  # a cubin before PTX
        ((9, 0), ["compute_80"], "compute_80 PTX"),
        ((12, 1), ["compute_90", "compute_100"], "compute_100 PTX"),  # the newest PTX
        ((9, 0), ["sm_90a"], "sm_90a cubin"),
        ((10, 0), ["sm_100f"], "sm_100f cubin"),
        ((9, 0), ["compute_90a"], "compute_90a PTX"),
    ],
)
def test_runs_on(capability, archs, image):
    ok, why = extension.runs_on(capability, archs)
    assert ok and why.startswith(
        f"runs on capability {capability[0]}.{capability[1]} through its {image}"
    ), why


@pytest.mark.parametrize(
    "capability,archs",
    [
        ((9, 0), ["sm_80"]),  # a cubin runs on its own major only
        ((8, 0), ["sm_86"]),  # ... and not on a lower minor
        ((8, 6), ["compute_89"]),  # PTX only on its capability and later
        ((9, 0), ["sm_100", "compute_100"]),
        ((10, 3), ["sm_100a"]),  # architecture-specific: that capability only
        ((10, 3), ["sm_100f"]),
        ((10, 0), ["compute_90a"]),
        ((9, 0), []),  # a build that recorded nothing
        ((9, 0), ["bogus", "sm_9"]),
    ],
)
def test_does_not_run_on(capability, archs):
    ok, why = extension.runs_on(capability, archs)
    assert not ok and why.startswith(
        f"the CUDA extension has no kernel image for capability "
        f"{capability[0]}.{capability[1]}: it holds "
    ), why
    assert 'TORCH_CUDA_ARCH_LIST="' in why and why.endswith(REBUILD), why


def test_extension_built_before_the_record_is_not_used(card):
    card((9, 0), archs="", visible=True)
    assert get_backend("auto", CUDA0).name == "triton"
    with pytest.raises(RuntimeError, match="it holds no recorded architecture"):
        get_backend("cuda", CUDA0)
    assert (
        "records no architectures (built before they were recorded: rebuild it"
        in tk.extension_status()
    )


# ------------------------------------------------------------ what extension_status says


def test_extension_status_names_the_archs_and_each_visible_card(card):
    card([(9, 0), (9, 0), (7, 5), (12, 0)], visible=True)
    status = tk.extension_status()
    assert status.startswith(
        "loaded: /site/tofu_kernels/_C.so; holds sm_80 sm_90 sm_100 compute_100; "
    ), status
    assert "; cuda:0,1: runs on capability 9.0 through its sm_90 cubin; " in status, status
    assert (
        "; cuda:2: the CUDA extension has no kernel image for capability 7.5: it holds " in status
    ), status
    assert "; cuda:3: runs on capability 12.0 through its compute_100 PTX" in status, status


def test_extension_status_without_a_device(card, monkeypatch):
    card((9, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    status = tk.extension_status()
    assert "; holds sm_80 sm_90 sm_100 compute_100; no CUDA device is visible" in status, status
    assert "cuda:0" not in status


# ------------------------------------------------------------ what setup.py records


@pytest.fixture(scope="module")
def setup_py():
    return runpy.run_path(str(ROOT / "setup.py"), run_name="tofu_setup")


LISTS = {
    "8.0;9.0;10.0+PTX": DEFAULT,
    "9.0": "sm_90",
    "8.0 8.6;12.0+PTX": "sm_80 sm_86 sm_120 compute_120",
    "9.0a;10.0a": "sm_90a sm_100a",
}


def test_setup_records_the_default_archs(setup_py):
    assert setup_py["DEFAULT_ARCH_LIST"] == "8.0;9.0;10.0+PTX"
    assert setup_py["held_archs"](setup_py["arch_flags"](setup_py["DEFAULT_ARCH_LIST"])) == DEFAULT


@pytest.mark.parametrize("arch_list", list(LISTS))
@pytest.mark.parametrize("source", ["torch", "parsed here"])
def test_setup_archs_follow_the_gencode_flags(setup_py, monkeypatch, arch_list, source):
    """The record is read from the -gencode flags torch's cpp_extension passes nvcc, or, where
    that private function is gone, from the same flags built here."""
    from torch.utils import cpp_extension

    if source == "parsed here":
        monkeypatch.delattr(cpp_extension, "_get_cuda_arch_flags")
    flags = setup_py["arch_flags"](arch_list)
    assert setup_py["held_archs"](flags) == LISTS[arch_list]
    for arch in LISTS[arch_list].split():
        kind, num = arch.split("_")
        assert f"-gencode=arch=compute_{num},code={arch}" in flags, flags


def test_setup_fallback_parser_refuses_what_it_cannot_read(setup_py, monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.delattr(cpp_extension, "_get_cuda_arch_flags")
    with pytest.raises(SystemExit, match="'Hopper' is not of the form 9.0, 9.0a or 10.0\\+PTX"):
        setup_py["arch_flags"]("Hopper")


def test_extension_status_with_a_device_that_cannot_be_queried(card, monkeypatch):
    card([(9, 0), (9, 0)], visible=True)

    def capability(device=None):
        if int(device) == 1:
            raise RuntimeError("CUDA error: unspecified launch failure")
        return (9, 0)

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    status = tk.extension_status()
    assert (
        "; cuda:0: runs on capability 9.0 through its sm_90 cubin; cuda:1: its capability is unknown (CUDA "
        "error: unspecified launch failure)" in status
    ), status
