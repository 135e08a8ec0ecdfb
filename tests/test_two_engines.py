"""Two engines in one process, GAN-style (DeepSpeedExamples' DCGAN): the generator's loss runs
through the discriminator's engine. The reference is the same loop in eager PyTorch with
torch.optim.Adam."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zerofx
from reference import deepspeed_step
from zerofx.runtime.grad_intake import LateGradientError


def _build():
    torch.manual_seed(0)
    return (nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8)),
            nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1)))


def _cfg(lr):
    return {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
            "zero_optimization": {"stage": 2},
            "optimizer": {"type": "Adam", "params": {"lr": lr, "betas": [0.5, 0.999]}}}


def _loop(G, D, g_back, g_step, d_back, d_step, d_module, freeze, steps=4):
    ones, zeros = torch.ones(4, 1), torch.zeros(4, 1)
    for s in range(steps):
        g = torch.Generator().manual_seed(s)
        real, z = torch.randn(4, 8, generator=g) + 2, torch.randn(4, 4, generator=g)
        d_module.zero_grad()
        fake = G(z)
        d_back(F.binary_cross_entropy_with_logits(D(real), ones)
               + F.binary_cross_entropy_with_logits(D(fake.detach()), zeros))
        d_step()
        d_module.requires_grad_(not freeze)
        g_back(F.binary_cross_entropy_with_logits(D(fake), ones))
        d_module.requires_grad_(True)
        g_step()


def test_the_discriminator_frozen_for_the_generator_step_trains_like_eager(no_torchrun_env):
    G, D = _build()
    eg = zerofx.initialize(model=G, config=_cfg(2e-3))[0]
    ed = zerofx.initialize(model=D, config=_cfg(1e-3))[0]
    _loop(eg, ed, eg.backward, eg.step, ed.backward, ed.step, D, freeze=True)
    rG, rD = _build()
    og = torch.optim.Adam(rG.parameters(), lr=2e-3, betas=(0.5, 0.999))
    od = torch.optim.Adam(rD.parameters(), lr=1e-3, betas=(0.5, 0.999))
    _loop(rG, rD, lambda loss: loss.backward(), lambda: deepspeed_step(rG, og, 0.0),
          lambda loss: loss.backward(), lambda: deepspeed_step(rD, od, 0.0), rD, freeze=True)
    for got, want in ((G, rG), (D, rD)):
        for p, q in zip(got.parameters(), want.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_without_freezing_it_the_error_names_the_fix(no_torchrun_env):
    G, D = _build()
    eg = zerofx.initialize(model=G, config=_cfg(2e-3))[0]
    ed = zerofx.initialize(model=D, config=_cfg(1e-3))[0]
    with pytest.raises(LateGradientError, match=r"another model's backward through this one.*"
                                                r"requires_grad_\(False\)"):
        _loop(eg, ed, eg.backward, eg.step, ed.backward, ed.step, D, freeze=False)
