"""transformers' print-once advisories do not split a model's graph (zerofx/dynamo_settings.py).

GPT-2's `loss_function` calls `logger.warning_once` on every forward (its config names no
loss type); Dynamo cannot trace a Logger method, so each call was a graph break: the loss
and the frames around it left the training graph as five more graphs.
"""
import logging

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import hf_batch, make_hf  # noqa: E402

CFG = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
       "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}


def _graphs_and_loss(no_torchrun_env):
    import zerofx

    model = make_hf("gpt2")
    want = make_hf("gpt2")(**hf_batch("gpt2", 0)).loss  # same seed: the same weights
    torch._dynamo.utils.counters.clear()
    engine, *_ = zerofx.initialize(model=model, config=CFG)
    loss = engine(**hf_batch("gpt2", 0)).loss
    return torch._dynamo.utils.counters["stats"]["unique_graphs"], loss, want


def test_gpt2_with_its_loss_is_one_graph(no_torchrun_env):
    from zerofx.dynamo_settings import IGNORED_LOGGING

    graphs, loss, want = _graphs_and_loss(no_torchrun_env)
    assert graphs == 1
    torch.testing.assert_close(loss, want)  # the loss is computed, not skipped
    assert logging.Logger.warning_once in getattr(torch._dynamo.config, IGNORED_LOGGING)


@pytest.mark.slow
def test_without_the_setting_the_loss_splits_the_graph(no_torchrun_env):
    """The reference: the same model with Dynamo's default breaks at the advisory (so the
    test above can fail). Dynamo's config is changed through its own patch(), never
    monkeypatch: setting its aliased name as a plain attribute broke every later test."""
    import zerofx.dynamo_settings as settings

    with settings.once_logging_breaks():
        graphs, loss, want = _graphs_and_loss(no_torchrun_env)
    assert graphs > 1
    torch.testing.assert_close(loss, want)
    assert logging.Logger.warning_once in getattr(torch._dynamo.config,
                                                  settings.IGNORED_LOGGING)  # restored
    assert settings.ONCE_METHODS == ("warning_once", "info_once")
