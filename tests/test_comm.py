"""deepspeed.comm's surface (zerofx/comm.py): one process without a group, and 2 ranks."""
import torch

from multiproc import run_ranks
from zerofx import comm


def test_without_a_process_group(no_torchrun_env):
    assert (comm.get_rank(), comm.get_world_size(), comm.is_initialized()) == (0, 1, False)
    t = torch.ones(3)
    assert comm.all_reduce(t, prof=True, log_name="x") is None and torch.equal(t, torch.ones(3))
    out = [torch.zeros(3)]
    comm.all_gather(out, t)
    assert torch.equal(out[0], t) and comm.barrier() is None


def _body(rank, world):
    import zerofx

    zerofx.as_deepspeed()
    from deepspeed import comm as dist  # as DeepSpeed's scripts write it

    dist.init_distributed(dist_backend="gloo")
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t, log_name="sum")
    gathered = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    flat = torch.zeros(world)
    dist.all_gather_into_tensor(flat, torch.tensor([float(10 * rank)]))
    mine = torch.zeros(1)
    dist.reduce_scatter_tensor(mine, torch.arange(world, dtype=torch.float32))
    dist.barrier()
    return (dist.get_rank(), dist.get_world_size(), t.item(), [g.item() for g in gathered],
            flat.tolist(), mine.item())


def test_two_ranks_against_the_arithmetic():
    for rank, got in enumerate(run_ranks(_body, 2)):
        assert got == (rank, 2, 3.0, [0.0, 1.0], [0.0, 10.0], 2.0 * rank)
