"""One data-parallel training step, run by tests/test_launch*.py through zerofx-launch.

    train_step.py OUT_DIR

Every rank inits gloo from the launcher's environment (env://), trains one SGD step of a tiny
model on its own batch with the gradients all-reduced, and writes OUT_DIR/rank<N>.json with
what it saw (rank, world size, the torchrun variables) and its parameters after the step.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F


def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch; the test rebuilds it for its single-process reference."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # same initial weights everywhere
    model = torch.nn.Linear(4, 2)
    x, y = batch(rank)
    F.mse_loss(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p -= 0.1 * p.grad / world
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE",
                                          "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    params = [v for p in model.parameters() for v in p.detach().flatten().tolist()]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": world, "env": env, "cwd": os.getcwd(),
                   "params": params}, f)
    print(f"step done on rank {rank} of {world}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
