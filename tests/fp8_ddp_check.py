"""Run by test_train.py under torch.distributed.run with 2 CPU ranks: DDP training through float8 layers with
fp8_weight_cast per_step gives the losses of per_matmul, bit for bit, on every rank. Each rank starts from its own
weights and makes its casts before DDP broadcasts rank 0's, so those casts must be renewed. Rank 0 prints a line per
rank."""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from dus_plugin.train.fp8 import float8_layers


def losses(folder: str, weight_cast: str, rank: int) -> list[float]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * rank)  # unlike rank 0's until DDP broadcasts them
    float8_layers(model, "tensorwise", weight_cast)
    model(input_ids=torch.zeros(1, 16, dtype=torch.long))  # casts made before the broadcast
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = []
    for step in range(2):
        for k in range(2):
            ids = torch.randint(0, model.config.vocab_size, (2, 32),
                                generator=torch.Generator().manual_seed(100 * rank + 10 * step + k))
            with ddp.no_sync() if k == 0 else torch.enable_grad():
                loss = ddp(input_ids=ids, labels=ids).loss
                loss.backward()
            out.append(loss.item())
        opt.step()
        opt.zero_grad()
    return out


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    reference, cast_once = losses(sys.argv[1], "per_matmul", rank), losses(sys.argv[1], "per_step", rank)
    lines = [None] * dist.get_world_size()
    dist.all_gather_object(lines, f"rank {rank}: {'equal' if reference == cast_once else 'DIFFERENT'} {cast_once}")
    if rank == 0:  # one writer: two ranks printing at once can share a line
        print("\n".join(lines), flush=True)
