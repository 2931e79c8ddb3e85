"""Pure-PyTorch backend: the CPU path and the fallback on any device.

Same interface and numerics contract as the Triton and CUDA backends (fp32 statistics,
closed-form gradient), processed in row chunks so the only temporaries are a few fp32
copies of one chunk (``CHUNK_ELEMS`` elements), never N x V. The O(N) epilogue is the math
of :mod:`tofu_kernels.tofu_math` in torch operations (the GPU backends run it as one
kernel); "gradient in the forward" runs the same two passes eagerly (there is no on-chip
row to keep on a CPU), so it serves to test the path.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..layout import RowLayout, Shard
from ..params import TOFUParams
from ..records import Epilogue, GradParam, Meta, MetricAcc, Partials, Reduction, Stat
from ..tofu_math import before_target_max, combine_stats, entropy_terms, finalize_stats, row_metrics
from .base import Backend

# 4 Mi fp32 elements = 16 MiB per temporary; a chunk holds at most a handful of them.
CHUNK_ELEMS = 1 << 22


def _row_blocks(x: torch.Tensor, lay: RowLayout) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (first row, end row, strided view of those rows) covering all rows in order."""
    n_outer = lay.n_rows // lay.n_inner
    # the storage offset left to as_strided (x's own): torch.compile cannot trace storage_offset()
    x3 = x.as_strided((n_outer, lay.n_inner, lay.width), (lay.s_outer, lay.s_inner, 1))
    rows = max(1, CHUNK_ELEMS // max(lay.width, 1))
    if lay.n_inner >= rows:
        for o in range(n_outer):
            for i0 in range(0, lay.n_inner, rows):
                i1 = min(i0 + rows, lay.n_inner)
                yield o * lay.n_inner + i0, o * lay.n_inner + i1, x3[o, i0:i1]
    else:
        step = rows // lay.n_inner
        for o0 in range(0, n_outer, step):
            o1 = min(o0 + step, n_outer)
            yield o0 * lay.n_inner, o1 * lay.n_inner, x3[o0:o1]


def _target_cols(labels: torch.Tensor, shard: Shard):
    local = labels - shard.vocab_start
    hit = (local >= 0) & (local < shard.n_valid)
    return local.clamp(0, max(shard.n_valid - 1, 0)).unsqueeze(1), hit


class TorchBackend(Backend):
    """The torch operations behind the Backend interface, on any device."""

    name = "torch"

    def available(self, device: torch.device) -> tuple[bool, str]:
        return True, ""

    def row_stats(
        self,
        x: torch.Tensor,
        lay: RowLayout,
        labels: torch.Tensor,
        shard: Shard,
        params: TOFUParams,
        meta: bool,
    ) -> Partials:
        """``[N, 1, len(Stat)]`` statistics over columns [0, n_valid) of each row, plus this
        rank's metadata record when ``meta`` (tensor parallelism), plus the metric accumulators
        with ``params.return_metrics``."""
        n_valid, beta = shard.n_valid, params.beta
        parts = Partials(x, lay.n_rows, 1, has_meta=meta, metrics=params.return_metrics)
        parts = parts._replace(
            data=torch.zeros(parts.per_rank(), dtype=torch.float32, device=x.device)
        )
        data = parts.data[: (lay.n_rows + int(meta)) * len(Stat)].view(-1, len(Stat))
        accs = parts.metric_accs()[0, :, 0] if parts.metrics else None  # [N, len(MetricAcc)]
        if accs is not None:
            accs[:, MetricAcc.BEFORE] = -torch.inf  # no column seen yet
        if meta:  # int32 bits, field by field, as the GPU statistics kernels write it
            record = data[lay.n_rows].view(torch.int32)
            for field, value in (
                (Meta.VOCAB_START, shard.vocab_start),
                (Meta.VOCAB_END, shard.vocab_end),
                (Meta.WIDTH, lay.width),
                (Meta.ROWS, lay.n_rows),
            ):
                record[field] = value
        stats = data[: lay.n_rows]
        if n_valid == 0:  # a shard holding only padding columns: (-inf, 0, 0, 0)
            stats[:, Stat.M] = -torch.inf
        else:
            for r0, r1, block in _row_blocks(x, lay):
                z = block.reshape(r1 - r0, lay.width)[:, :n_valid].float()
                m = z.amax(dim=1)
                e = z - m.unsqueeze(1)
                ex = e.exp()
                s1 = ex.sum(dim=1)
                if accs is not None:
                    accs[r0:r1, MetricAcc.E] = entropy_terms(e, ex).sum(dim=1)
                    accs[r0:r1, MetricAcc.BEFORE] = before_target_max(
                        z, labels[r0:r1] - shard.vocab_start
                    )
                sb = s1 if beta == 1.0 else e.div_(beta).exp_().sum(dim=1)
                col, hit = _target_cols(labels[r0:r1], shard)
                zt = torch.where(hit, z.gather(1, col).squeeze(1), 0.0)
                for field, value in ((Stat.M, m), (Stat.S1, s1), (Stat.SB, sb), (Stat.ZT, zt)):
                    stats[r0:r1, field] = value
        return parts

    def epilogue(
        self,
        parts: Partials,
        labels: torch.Tensor,
        params: TOFUParams,
        vocab_size: int | None,
        reduction: Reduction,
    ) -> Epilogue:
        """Merge every part of each row, finalize, reduce: on the device, no host sync. A mean
        divides by the number of non-ignored tokens, at least 1 (all ignored: 0, zero gradient)."""
        rec = parts.records().permute(1, 0, 2, 3).reshape(parts.n_rows, -1, len(Stat))
        if parts.metrics:
            accs = parts.metric_accs().permute(1, 0, 2, 3).reshape(parts.n_rows, -1, len(MetricAcc))
            merged, accs = combine_stats(rec, params.beta, 1, accs)
        else:
            merged, accs = combine_stats(rec, params.beta, dim=1), None
        if vocab_size is None:  # tensor parallel: the global size from the ranks' metadata
            vocab_size = parts.metas()[:, Meta.VOCAB_END].amax().to(torch.int64)
        res = finalize_stats(
            merged, labels, params.gamma, params.beta, params.ignore_index, vocab_size
        )
        metrics = (
            None
            if accs is None
            else row_metrics(merged, accs, labels, params.ignore_index, vocab_size)
        )
        if reduction == Reduction.MEAN:
            scale = 1.0 / (labels != params.ignore_index).sum().clamp(min=1).to(torch.float32)
        else:
            scale = torch.ones((), dtype=torch.float32, device=res.loss.device)
        fields = {
            GradParam.G: res.g,
            GradParam.M: res.m,
            GradParam.LOG_SB: res.log_sb,
            GradParam.QT_M1: res.qt_m1,
        }
        grad_rec = torch.stack([fields[f] for f in GradParam], dim=1)
        return Epilogue(
            res.loss, res.ce, grad_rec, res.loss.sum() * scale, res.ce.sum() * scale, scale, metrics
        )

    def grad(
        self,
        x: torch.Tensor,
        lay: RowLayout,
        out: torch.Tensor,
        out_lay: RowLayout,
        labels: torch.Tensor,
        grad_rec: torch.Tensor,
        upstream: torch.Tensor,
        scale: torch.Tensor,
        shard: Shard,
        params: TOFUParams,
    ) -> None:
        """Write ``coef * (softmax(z/beta) - onehot)`` into ``out`` (may alias ``x``), with
        ``coef = upstream_i * scale * g_i`` folded in fp32; padding columns get 0."""
        assert out_lay.n_inner == lay.n_inner, "out must share x's row grouping"
        n_valid, beta = shard.n_valid, params.beta
        coef_all = (upstream.reshape(-1).float() * scale * grad_rec[:, GradParam.G]).expand(
            lay.n_rows
        )
        for (r0, r1, block), (_, _, out_block) in zip(
            _row_blocks(x, lay), _row_blocks(out, out_lay)
        ):
            rec = grad_rec[r0:r1]
            coef = coef_all[r0:r1]
            m, log_sb, qt_m1 = (
                rec[:, GradParam.M],
                rec[:, GradParam.LOG_SB],
                rec[:, GradParam.QT_M1],
            )
            z = block.reshape(r1 - r0, lay.width)[:, :n_valid].float()
            g = torch.zeros(r1 - r0, lay.width, dtype=torch.float32, device=x.device)
            q = ((z - m.unsqueeze(1)) / beta - log_sb.unsqueeze(1)).exp_()
            g[:, :n_valid] = q.mul_(coef.unsqueeze(1))
            col, hit = _target_cols(labels[r0:r1], shard)
            g.scatter_(
                1, col, torch.where(hit, coef * qt_m1, g.gather(1, col).squeeze(1)).unsqueeze(1)
            )
            out_block.copy_(g.view(out_block.shape))

    def grad_in_forward(
        self,
        x: torch.Tensor,
        lay: RowLayout,
        out: torch.Tensor,
        out_lay: RowLayout,
        labels: torch.Tensor,
        params: TOFUParams,
        reduction: Reduction,
    ) -> Epilogue:
        """Loss and gradient (for an upstream gradient of 1) in the forward, whole rows."""
        shard = Shard(0, lay.width)
        epi = self.epilogue(
            self.row_stats(x, lay, labels, shard, params, False),
            labels,
            params,
            lay.width,
            reduction,
        )
        one = torch.ones((), dtype=torch.float32, device=x.device)
        self.grad(x, lay, out, out_lay, labels, epi.grad_rec, one, epi.scale, shard, params)
        return epi._replace(grad_rec=None)

    def rescale(self, out: torch.Tensor, out_lay: RowLayout, grad_out: torch.Tensor) -> None:
        """``out *= grad_out`` (exact when it is 1)."""
        s = grad_out.reshape(()).float()
        for _, _, block in _row_blocks(out, out_lay):
            block.mul_(s)


BACKEND = TorchBackend()
