"""``deepspeed.utils.RepeatingLoader``: iterate over a loader forever (a new pass after each
StopIteration), as DeepSpeed's does, for step-counted training loops."""
from __future__ import annotations


class RepeatingLoader:
    def __init__(self, loader):
        self.loader = loader
        self.data_iter = iter(self.loader)

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            return next(self.data_iter)
