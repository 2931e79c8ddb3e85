"""Run a test function on N gloo processes (CPU) and surface any worker failure.

A worker that passed leaves with ``os._exit(0)`` right after destroying its process
group, without Python's interpreter finalisation. Reason (a core dump, 2026-11-27): gloo
destroys a finished all-gather's work object on its own worker thread, which drops the
Python tensors it held and so needs the GIL; when that happens while the main thread is
already finalising the interpreter, CPython ends the worker thread with a forced unwind
through a noexcept C++ frame and the process dies with ``terminate called without an
active exception`` (SIGABRT), after the test itself has passed (about 1 run in 30-50 here).
A worker that failed exits the normal way: its traceback reaches the parent first.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, module: str, fn_name: str, kwargs: dict):
    faulthandler.enable(all_threads=True)  # a native crash prints every thread's Python stack
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        getattr(importlib.import_module(module), fn_name)(rank, world, **kwargs)
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # passed: skip interpreter finalisation (see the module docstring)


def run_distributed(world: int, fn, **kwargs) -> None:
    """Spawn ``world`` processes running ``fn(rank, world, **kwargs)`` under gloo.

    ``fn`` must be a module-level function (the children re-import its module). An
    exception in any rank fails the calling test with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        mp.spawn(_entry, args=(world, init_file, fn.__module__, fn.__name__, kwargs), nprocs=world)


def free_port() -> int:
    """A free TCP port on this host, for a launcher's rendezvous (another test file may be
    launching at the same time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shared_device(device: str) -> torch.device:
    """``device`` for a rank of ``run_distributed``: "cuda" is the one GPU every process shares."""
    if device == "cuda":
        torch.cuda.set_device(0)
    return torch.device(device)


def stage_all_gather_through_host_if_needed(device: torch.device) -> str:
    """Probe gloo's all_gather with tensors on `device`; if refused, route the library's
    one all-gather through host memory (test harness only). Returns what was done."""
    from tofu_kernels import vocab_parallel

    probe = torch.ones(2, device=device)
    out = torch.empty(2 * dist.get_world_size(), device=device)
    try:
        vocab_parallel._all_gather(out, probe, None)
        return "native"
    except (RuntimeError, ValueError) as e:
        native = vocab_parallel._all_gather

        def staged(out_t, inp_t, group):
            host = torch.empty(out_t.shape, dtype=out_t.dtype)
            native(host, inp_t.cpu(), group)
            out_t.copy_(host)

        vocab_parallel._all_gather = staged
        return f"staged through host memory (gloo refused {device.type} tensors: {str(e).splitlines()[0][:80]})"


def assert_same_on_all_ranks(t: torch.Tensor) -> None:
    """``t`` is bitwise the same on every rank (compared in host memory: any device)."""
    parts = [torch.empty_like(t, device="cpu") for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().cpu().contiguous())
    assert all(torch.equal(p, parts[0]) for p in parts), "loss differs across ranks"
