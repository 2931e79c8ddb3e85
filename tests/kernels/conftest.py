"""The kernel tests' fixtures."""

import pytest

from tofu_kernels.backends import triton_backend


@pytest.fixture(params=["one_tile", "many_tiles", "many_splits"])
def tiling(request, monkeypatch):
    """Triton tile/split configurations (the torch backend ignores them), so that rows of a
    few hundred columns cross several tiles: the online rescaling, the merges of the split
    statistics, the gradient's tiles and the gradient-in-forward kernel's loop.

    many_tiles: one program loops over several 64-wide tiles in every kernel (the statistics,
    the gradient and the rescale, the gradient-in-forward kernel); many_splits: each
    row's statistics are split over programs and merged after.
    """
    if request.param == "many_tiles":
        monkeypatch.setattr(triton_backend, "TILE_COLS", 64)
        monkeypatch.setattr(triton_backend, "ROW_BLOCK", 64)
        monkeypatch.setattr(triton_backend, "TARGET_BLOCKS", 1)
    elif request.param == "many_splits":
        monkeypatch.setattr(triton_backend, "TILE_COLS", 32)
        monkeypatch.setattr(triton_backend, "TARGET_BLOCKS", 4096)
    return request.param
