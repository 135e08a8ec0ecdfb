"""The distributed data loader behind ``zerofx.initialize(training_data=...)``.

Each data-parallel rank reads its own shuffled part of the dataset (DistributedSampler,
seed 0), in micro-batches of ``train_micro_batch_size_per_gpu``, as DeepSpeed's loader does,
and like DeepSpeed's it reads the same order every epoch: DeepSpeedDataLoader never calls
the sampler's ``set_epoch``. A script that wants a new order per epoch calls
``loader.data_sampler.set_epoch(epoch)`` (DeepSpeed's attribute name), as with DeepSpeed.
"""
from __future__ import annotations

from torch.utils.data import DataLoader, Dataset, DistributedSampler

from zerofx.config import ConfigError


class DistributedLoader:
    """Iterate over this rank's micro-batches; every pass is an epoch in the same order."""

    def __init__(self, dataset: Dataset, *, batch_size: int, dp_rank: int, dp_size: int,
                 shuffle: bool = True, seed: int = 0, collate_fn=None, drop_last: bool = False):
        # The sampler pads every rank to the same sample count (drop_last=False) or cuts
        # them to it, so every rank runs the same number of steps: a collective never hangs.
        # drop_last follows DeepSpeed's dataloader_drop_last (default false).
        self.sampler = DistributedSampler(dataset, num_replicas=dp_size, rank=dp_rank,
                                          shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler,
                                 collate_fn=collate_fn, drop_last=drop_last)
        if len(self.loader) == 0:
            raise ConfigError(
                f"the training data ({len(dataset)} samples) gives no batch of "
                f"train_micro_batch_size_per_gpu={batch_size} on each of {dp_size} "
                f"data-parallel rank(s) with dataloader_drop_last true: use more data, a "
                f"smaller micro-batch, or dataloader_drop_last false")
        self.data_sampler = self.sampler  # DeepSpeedDataLoader's name for it

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)
