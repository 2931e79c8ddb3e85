"""Run a test function on N gloo processes (CPU) and surface any worker failure."""

from __future__ import annotations

import importlib
import os
import tempfile

import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, module: str, fn_name: str, kwargs: dict):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        getattr(importlib.import_module(module), fn_name)(rank, world, **kwargs)
    finally:
        dist.destroy_process_group()


def run_distributed(world: int, fn, **kwargs) -> None:
    """Spawn ``world`` processes running ``fn(rank, world, **kwargs)`` under gloo.

    ``fn`` must be a module-level function (the children re-import its module). An
    exception in any rank fails the calling test with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "init")
        mp.spawn(_entry, args=(world, init_file, fn.__module__, fn.__name__, kwargs), nprocs=world)
