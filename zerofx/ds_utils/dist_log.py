"""``deepspeed.utils.logger`` / ``log_dist``: DeepSpeed's logger and its per-rank messages.

DeepSpeed's logger is named "DeepSpeed", writes to stdout in its own format, does not
propagate, and starts at WARNING (its engine lowers it from the config's ``log_level``);
this one follows it under zerofx's name, so a real DeepSpeed's logger, if one is ever
imported beside zerofx, is left alone.
"""
from __future__ import annotations

import functools
import logging
import sys

import torch.distributed as dist

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "critical": logging.CRITICAL}


def _make_logger() -> logging.Logger:
    logger_ = logging.getLogger("zerofx.deepspeed")
    logger_.setLevel(logging.WARNING)
    logger_.propagate = False
    if not logger_.handlers:  # a re-import keeps one handler
        handler = logging.StreamHandler(stream=sys.stdout)
        handler.setFormatter(logging.Formatter(
            "[%(asctime)s] [%(levelname)s] [%(filename)s:%(lineno)d:%(funcName)s] %(message)s"))
        logger_.addHandler(handler)
    return logger_


logger = _make_logger()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else -1


def get_dist_msg(message, ranks=None):
    """DeepSpeed's rule: "[Rank r] message" when no process group exists, or when this
    rank is in ``ranks`` (``[-1]``: every rank); None otherwise (nothing to log)."""
    rank = _rank()
    should = rank == -1 or bool(ranks) and (ranks[0] == -1 or rank in set(ranks))
    return f"[Rank {rank}] {message}" if should else None


def log_dist(message, ranks=None, level=logging.INFO) -> None:
    """Log ``message`` on the ranks ``ranks`` (all of them with ``[-1]``; see get_dist_msg)."""
    text = get_dist_msg(message, ranks)
    if text is not None:
        logger.log(level, text)


def print_dist(message, ranks=None) -> None:
    """log_dist's rule, printed whatever the log level."""
    text = get_dist_msg(message, ranks)
    if text is not None:
        print(text)


@functools.lru_cache(None)
def _once(message, ranks, level) -> None:
    log_dist(message, list(ranks) if ranks is not None else None, level)


def log_dist_once(message, ranks=None, level=logging.INFO) -> None:
    """log_dist, each distinct message once per process."""
    _once(message, tuple(ranks) if ranks is not None else None, level)


def set_log_level_from_string(log_level_str: str, custom_logger=None) -> None:
    """DeepSpeed's: "debug", "info", "warning", "error" or "critical"."""
    level = LEVELS.get(str(log_level_str).lower())
    if level is None:
        raise ValueError(f"log level {log_level_str!r} is not one of {sorted(LEVELS)}")
    (custom_logger or logger).setLevel(level)
