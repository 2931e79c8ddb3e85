"""Vocab-parallel TOFU loss across tensor-parallel ranks.

    torchrun --nproc-per-node 2 examples/vocab_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 8 examples/vocab_parallel.py --cuda     # GPUs, NCCL

Each rank holds a [s, b, V/tp] slice of the logits (Megatron's layout); the loss is
identical on every rank and each rank's gradient covers only its own slice.
"""

import argparse

import torch
import torch.distributed as dist

import tofu_kernels as tk

p = argparse.ArgumentParser()
p.add_argument("--cuda", action="store_true")
p.add_argument("--vocab", type=int, default=32000)
args = p.parse_args()

dist.init_process_group("nccl" if args.cuda else "gloo")
rank, tp = dist.get_rank(), dist.get_world_size()
device = (
    torch.device("cuda", rank % torch.cuda.device_count()) if args.cuda else torch.device("cpu")
)
if args.cuda:
    torch.cuda.set_device(device)

s, b, vr = 128, 2, args.vocab // tp
torch.manual_seed(0)  # the same full logits and labels on every rank
full = torch.randn(s, b, vr * tp, device=device, dtype=torch.bfloat16)
labels = torch.randint(0, vr * tp, (b, s), device=device)  # Megatron's [b, s] labels
shard = full[..., rank * vr : (rank + 1) * vr].clone().requires_grad_()

# [s, b, V/tp] logits with [b, s] labels: pass the transposed view, no copy is made.
loss, ce = tk.vocab_parallel_tofu_loss(
    shard.transpose(0, 1), labels, gamma=3.0, beta=0.8, reduction="mean", return_ce=True
)
loss.backward()

reference = tk.tofu_loss_reference(full.transpose(0, 1), labels)[0].mean()
print(
    f"rank {rank}/{tp}: tofu {loss.item():.6f} (fp64 reference {reference.item():.6f}), "
    f"ce {ce.item():.4f}, ppl {ce.exp().item():.1f}, grad {tuple(shard.grad.shape)}"
)
assert abs(loss.item() - reference.item()) < 1e-4
dist.destroy_process_group()
