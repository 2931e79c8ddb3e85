"""Both GPU backends' ops on fake CUDA tensors, without a GPU: what a model's training step
asks of them, traced.

FakeTensorMode makes CUDA tensors that hold only metadata; the ops then run their fakes (the
contracts of ``gpu.OPS``) and the autograd Functions around them. Each scenario is traced with
``make_fx`` (forward, then the backward through ``loss.grad_fn.apply``: ``loss.backward()``
needs a CUDA context), and compiled with ``torch.compile(fullgraph=True)`` on the ``eager`` and
``aot_eager`` backends (forward: the training graph needs a driver). The stand-in Triton driver
is active, so Triton's ops trace into their kernels; the CUDA backend sees an sm_90 device.

    python -m tools.static_check.fake_cuda       # prints one JSON line per scenario
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

from .triton_aot import use_target

SCENARIOS = ("mean", "none", "megatron", "metrics", "linear")


def _ops(gm) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        name = str(n.target)
        if "auto_functionalized" in name:  # a mutating op, functionalized by AOTAutograd
            name = str(n.args[0])
        if "tofu_kernels" in name:
            out.append(name.split(".")[1])
        elif "triton_kernel_wrapper" in name:
            from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

            out.append("kernel:" + kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__)
    return out


def _inputs(scenario: str):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        bf16 = dict(device="cuda", dtype=torch.bfloat16)
        labels = torch.randint(0, 1000, (64,), device="cuda")
        if scenario == "megatron":  # logits [s, b, v] seen as [b, s, v], labels [b, s]
            x = torch.randn(32, 2, 1000, **bf16).transpose(0, 1).detach().requires_grad_()
            labels = labels.view(2, 32)
        elif scenario == "linear":
            x = (
                torch.randn(64, 48, **bf16, requires_grad=True),
                torch.randn(1000, 48, **bf16, requires_grad=True),
            )
        else:
            x = torch.randn(64, 1000, **bf16, requires_grad=True)
    return x, labels


def _loss(scenario: str, backend: str):
    import tofu_kernels as tk

    common = dict(backend=backend, check_inputs=False)
    if scenario == "mean":
        return lambda x, labels: tk.tofu_loss(x, labels, **common)
    if scenario == "none":
        return lambda x, labels: tk.tofu_loss(x, labels, reduction="none", **common)
    if (
        scenario == "megatron"
    ):  # logits the model computed (x * 1), dead after the loss: gradient in place
        return lambda x, labels: tk.tofu_loss(
            x * 1, labels, reduction="none", inplace_backward=True, **common
        )
    if scenario == "metrics":
        return lambda x, labels: tk.tofu_loss(
            x, labels, reduction="none", return_metrics=True, **common
        )[0]
    if (
        scenario == "linear"
    ):  # "sum": a mean counts its tokens on the host, which fake tensors cannot
        return lambda hw, labels: tk.linear_tofu_loss(
            hw[0], hw[1], labels, reduction="sum", **common
        )
    raise ValueError(scenario)


def trace(scenario: str, backend: str) -> dict:
    """make_fx of forward + backward: the ops, in order, and what the loss and gradients are."""
    from torch.fx.experimental.proxy_tensor import make_fx

    loss_fn = _loss(scenario, backend)
    x, labels = _inputs(scenario)

    def step(x, labels):
        loss = loss_fn(x, labels)
        with torch.no_grad():  # as the autograd engine runs a backward (create_graph=False)
            grads = loss.grad_fn.apply(torch.ones_like(loss))
        return (loss,) + tuple(
            g for g in (grads if isinstance(grads, tuple) else (grads,)) if g is not None
        )

    gm = make_fx(step, tracing_mode="fake")(x, labels)
    (results,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
    return {"ops": _ops(gm), "outputs": [list(r.meta["val"].shape) for r in results]}


def compiled(scenario: str, backend: str, compiler: str) -> dict:
    """torch.compile(fullgraph=True) of the forward on fake CUDA tensors; the graphs' ops."""
    from torch._dynamo.backends.common import aot_autograd

    loss_fn = _loss(scenario, backend)
    x, labels = _inputs(scenario)
    x = x.detach() if isinstance(x, torch.Tensor) else tuple(t.detach() for t in x)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    cb = capture if compiler == "eager" else aot_autograd(fw_compiler=capture)
    fn = torch.compile(loss_fn, fullgraph=True, backend=cb)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        loss = fn(x, labels)
    return {
        "ops": [op for g in graphs for op in _ops(g)],
        "outputs": [list(loss.shape)],
        "device": str(loss.device),
    }


def main() -> int:
    os.environ.pop("TRITON_INTERPRET", None)
    use_target(90)
    torch.cuda.get_device_capability = lambda device=None: (9, 0)  # the card the CUDA backend sees
    torch.cuda.current_device = lambda: 0
    import tofu_kernels as tk

    backends = ["triton"] + (["cuda"] if tk.extension_loaded() else [])
    for backend in backends:
        for scenario in SCENARIOS:
            for how in ("make_fx", "eager", "aot_eager"):
                rec = {"backend": backend, "scenario": scenario, "how": how}
                try:
                    rec.update(
                        trace(scenario, backend)
                        if how == "make_fx"
                        else compiled(scenario, backend, how)
                    )
                    rec["ok"] = True
                except Exception as e:  # reported, and failed by the tests
                    rec.update(
                        ok=False,
                        error=f"{type(e).__name__}: {e}",
                        trace=traceback.format_exc()[-2000:],
                    )
                print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
