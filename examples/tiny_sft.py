"""A small GPT supervised fine-tuning loop on Megatron-Core: a DEMONSTRATION, not a trainer.

It is the CPU trainer behind `make demo` (examples/diversity_demo.py): a Megatron-Core
GPTModel (local layer spec), tensor parallel only (world size = TP; no data or pipeline
parallelism, no distributed optimizer, no Megatron checkpoints), trained with AdamW on a
JSONL file of {"prompt", "response"} records (loss on response tokens only), {"text"}
records, or mock data, byte-level tokens. The loss goes through Megatron's own
LanguageModule.compute_language_model_loss, i.e. through megatron_patch when
--loss-type tofu, and it logs the masked loss, the plain cross entropy and perplexity.

For real training use Megatron-LM's pretrain_gpt.py through `python -m
megatron_patch.launch` (docs/megatron.md).

    torchrun --nproc-per-node 2 examples/tiny_sft.py --data sft.jsonl --loss-type tofu \
        --tofu-gamma 3.0 --tofu-beta 0.8 --train-iters 200 --save ckpt/

Vocab padded to a multiple of 8 * TP as Megatron pads it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_patch import add_arguments, apply_from_args, cross_entropy_of

BOS, SEP, EOS, PAD = 256, 257, 258, 259
N_SPECIAL = 4


def vocab_size(tp: int) -> int:
    """256 bytes + 4 specials, padded to a multiple of 8 * tp (Megatron's padding)."""
    mult = 8 * tp
    return math.ceil((256 + N_SPECIAL) / mult) * mult


def encode_record(rec: dict, seq_len: int) -> tuple[list[int], list[int]]:
    """Tokens (seq_len + 1) and a loss mask over the seq_len label positions."""
    if "text" in rec:
        toks = [BOS] + list(rec["text"].encode()) + [EOS]
        weight = [1] * (len(toks) - 1)
    elif "prompt" in rec and "response" in rec:
        prompt = [BOS] + list(rec["prompt"].encode()) + [SEP]
        resp = list(rec["response"].encode()) + [EOS]
        toks = prompt + resp
        # label position i predicts toks[i + 1]: response tokens (and EOS) carry the loss
        weight = [0] * (len(prompt) - 1) + [1] * len(resp)
    else:
        raise ValueError(f"record needs 'text' or 'prompt' and 'response' keys: {sorted(rec)}")
    toks, weight = toks[: seq_len + 1], weight[:seq_len]
    pad = seq_len + 1 - len(toks)
    return toks + [PAD] * pad, weight + [0] * (seq_len - len(weight))


def decode(ids) -> str:
    return bytes(i for i in ids if i < 256).decode(errors="replace")


def load_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Batches:
    """Encoded records; ``sample`` draws the same batch on every rank (seeded)."""

    tokens: torch.Tensor  # [n, seq + 1] int64
    loss_mask: torch.Tensor  # [n, seq] float

    @classmethod
    def from_records(cls, records: list[dict], seq_len: int) -> Batches:
        enc = [encode_record(r, seq_len) for r in records]
        return cls(
            torch.tensor([t for t, _ in enc]),
            torch.tensor([w for _, w in enc], dtype=torch.float32),
        )

    @classmethod
    def mock(cls, n: int, seq_len: int, seed: int) -> Batches:
        g = torch.Generator().manual_seed(seed)
        return cls(torch.randint(0, 256, (n, seq_len + 1), generator=g), torch.ones(n, seq_len))

    def sample(self, batch: int, gen: torch.Generator):
        idx = torch.randint(0, len(self.tokens), (batch,), generator=gen)
        return self.tokens[idx], self.loss_mask[idx]

    def chunks(self, batch: int):
        for i in range(0, len(self.tokens), batch):
            yield self.tokens[i : i + batch], self.loss_mask[i : i + batch]


def init_parallel(tp: int, device: str) -> None:
    """Process group + Megatron parallel state for TP = world size (CPU: gloo)."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if dist.get_world_size() != tp:
        raise SystemExit(
            f"sft: world size {dist.get_world_size()} must equal --tp {tp} (no DP/PP here)"
        )
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    else:
        # Megatron hard-codes torch.cuda.current_device() (RoPE, buffers, TP maps).
        torch.cuda.current_device = lambda: "cpu"
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def build_model(args) -> torch.nn.Module:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(args.seed)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    cfg = TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_heads,
        # CPU init on every device: each rank takes its slice of one seeded master weight,
        # so shards differ and a CPU and a GPU run start from the same model.
        tensor_model_parallel_size=args.tp,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=args.bf16,
        pipeline_dtype=dtype,
    )
    model = GPTModel(
        cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=vocab_size(args.tp),
        max_sequence_length=args.seq_length,
    )
    if args.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(cfg, model)
    return model.to(args.device)


def _inputs(tokens: torch.Tensor, device: str):
    ids, labels = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    s = ids.shape[1]
    pos = torch.arange(s, device=device).expand_as(ids)
    mask = torch.triu(torch.ones(s, s, device=device), diagonal=1).bool()[None, None]
    return ids, pos, mask, labels


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def train_step(model, optimizer, tokens, loss_mask, device):
    """One step; returns (masked training loss, masked plain CE) as detached tensors."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    ids, pos, mask, labels = _inputs(tokens, device)
    lm = loss_mask.to(device)
    per_token = model(ids, pos, mask, labels=labels)
    loss = masked_mean(per_token, lm)
    loss.backward()
    optimizer.step()
    ce = cross_entropy_of(per_token)
    ce = masked_mean(ce, lm) if ce is not None else loss.detach()  # CE mode: the loss is CE
    return loss.detach(), ce


@torch.no_grad()
def full_logits(model, tokens: torch.Tensor, device: str) -> torch.Tensor:
    """fp32 logits [b, s, V] over the full vocab (gathered across TP ranks)."""
    from megatron.core import parallel_state

    model.eval()
    ids, pos, mask, _ = _inputs(tokens, device)
    shard = model(ids, pos, mask).float()  # labels=None: [b, s, V/tp]
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., : 256 + N_SPECIAL]  # drop vocab padding


@torch.no_grad()
def evaluate_ce(
    model, data: Batches, device: str, batch: int = 32, temperature: float = 1.0
) -> tuple[float, float]:
    """Masked mean cross entropy of softmax(logits / temperature) and next-token accuracy
    over ``data``."""
    tot, acc, n = 0.0, 0.0, 0.0
    for tokens, lm in data.chunks(batch):
        logits = full_logits(model, tokens, device) / temperature
        labels = tokens[:, 1:].to(device)
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        lm = lm.to(device)
        tot += float((ce * lm).sum())
        acc += float(((logits.argmax(-1) == labels).float() * lm).sum())
        n += float(lm.sum())
    return tot / max(n, 1), acc / max(n, 1)


def save(model, path: str | Path) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path / f"tp_rank{dist.get_rank()}.pt")


def load(model, path: str | Path) -> None:
    sd = torch.load(
        Path(path) / f"tp_rank{dist.get_rank()}.pt", map_location="cpu", weights_only=True
    )
    model.load_state_dict(sd)


def make_optimizer(args, model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)


def train(
    args,
    model,
    data: Batches,
    log=print,
    optimizer=None,
    gen=None,
    start: int = 0,
    total: int | None = None,
) -> list[dict]:
    """Train ``args.train_iters`` steps with AdamW; returns the logged history.

    Pass ``optimizer`` and ``gen`` to continue a run in chunks (iterations counted from
    ``start``, the progress lines out of ``total``, the whole run's iterations; default: this
    call's last); by default a fresh AdamW and a generator seeded with ``args.seed``, so
    every TP rank draws the same batches.
    """
    optimizer = optimizer or make_optimizer(args, model)
    gen = gen or torch.Generator().manual_seed(args.seed)
    history, t0 = [], time.time()
    end = start + args.train_iters
    total = end if total is None else total
    for it in range(start + 1, end + 1):
        tokens, lm = data.sample(args.micro_batch_size, gen)
        loss, ce = train_step(model, optimizer, tokens, lm, args.device)
        if it % args.log_interval == 0 or it == end:
            rec = {
                "iter": it,
                "loss": float(loss),
                "ce": float(ce),
                "ppl": math.exp(min(float(ce), 50.0)),
                "s": time.time() - t0,
            }
            history.append(rec)
            if dist.get_rank() == 0:
                log(
                    f"iter {it:5d}/{total} | {args.loss_type} loss {rec['loss']:.4f} | "
                    f"cross entropy {rec['ce']:.4f} | ppl {rec['ppl']:.2f} | {rec['s']:.1f} s"
                )
    return history


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default="mock", help="JSONL with prompt/response or text records, or 'mock'"
    )
    p.add_argument(
        "--tp", type=int, default=None, help="tensor-parallel size (default: world size)"
    )
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=64)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-iters", type=int, default=100)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--load", default=None, help="checkpoint folder to start from")
    p.add_argument("--save", default=None, help="checkpoint folder to write at the end")
    return add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.tp = args.tp or int(os.environ.get("WORLD_SIZE", "1"))
    init_parallel(args.tp, args.device)
    apply_from_args(args)
    model = build_model(args)
    if args.load:
        load(model, args.load)
    data = (
        Batches.mock(1024, args.seq_length, args.seed)
        if args.data == "mock"
        else Batches.from_records(load_jsonl(args.data), args.seq_length)
    )
    train(args, model, data)
    if args.save:
        save(model, args.save)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
