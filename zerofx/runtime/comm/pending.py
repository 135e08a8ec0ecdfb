"""Pending: a started collective's works and what to do once they finish (any form)."""
from __future__ import annotations

import time

import torch


class Pending:
    """The works of one started collective, and what to do once they have finished."""

    def __init__(self, works, then=None):
        self.works, self.then = [w for w in works if w is not None], then
        self._log = None

    def logged(self, log, role: str, key: int, form: str, numel: int,
               dtype: torch.dtype) -> "Pending":
        """Report start and wait to ``log`` (runtime/comm/log.CommLog; None: not logged)."""
        if log is not None:
            self._log = (log, log.started(role, key, form, numel, dtype))
        return self

    def wait(self) -> None:
        began = time.perf_counter()
        for w in self.works:
            w.wait()
        if self.then is not None:
            self.then()
        if self._log is not None:
            log, token = self._log
            log.finished(token, began)
