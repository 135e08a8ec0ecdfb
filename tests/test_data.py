"""DistributedLoader: DeepSpeed's dataloader_drop_last, equal steps on every rank, no silent
empty loader."""
import pytest
import torch
from torch.utils.data import TensorDataset

from zerofx.config import ConfigError
from zerofx.data import DistributedLoader


def _data(n):
    return TensorDataset(torch.arange(n, dtype=torch.float32))


def test_keeps_the_last_partial_batch_by_default_equal_on_every_rank():
    loaders = [DistributedLoader(_data(10), batch_size=4, dp_rank=r, dp_size=2, shuffle=False)
               for r in range(2)]
    sizes = [[len(b[0]) for b in loader] for loader in loaders]
    assert sizes == [[4, 1], [4, 1]]  # 5 samples each: same step count, nothing dropped
    seen = sorted(int(v) for loader in loaders for b in loader for v in b[0])
    assert seen == list(range(10))


def test_drop_last_drops_it():
    loader = DistributedLoader(_data(10), batch_size=4, dp_rank=0, dp_size=2, drop_last=True)
    assert [len(b[0]) for b in loader] == [4]


def test_a_loader_with_no_batch_is_an_error():
    with pytest.raises(ConfigError, match="gives no batch.*dataloader_drop_last"):
        DistributedLoader(_data(3), batch_size=4, dp_rank=0, dp_size=2, drop_last=True)


def test_every_epoch_reads_the_same_order_as_deepspeeds_loader(no_torchrun_env):
    # DeepSpeedDataLoader (0.19.8) builds a DistributedSampler (shuffle, seed 0) and never
    # calls its set_epoch: each epoch repeats the first one's order
    import torch
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from zerofx.data import DistributedLoader

    data = TensorDataset(torch.arange(20.0))
    ours = DistributedLoader(data, batch_size=3, dp_rank=1, dp_size=2)
    first, second = [b[0].tolist() for b in ours], [b[0].tolist() for b in ours]
    theirs = DataLoader(data, batch_size=3, sampler=DistributedSampler(
        data, num_replicas=2, rank=1))  # DeepSpeed's construction, epoch never set
    want = [b[0].tolist() for b in theirs]
    assert first == second == want
    ours.data_sampler.set_epoch(1)  # a script may still ask for a new order
    assert [b[0].tolist() for b in ours] != first
