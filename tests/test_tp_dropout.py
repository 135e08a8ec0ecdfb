"""Dropout under tensor parallelism: one mask for a replicated activation on every TP rank.

Between a row-parallel layer (its output all-reduced) and the next column-parallel one,
every TP rank holds the same activation; dropout there must drop the same elements on each,
or the ranks' copies part and their replicated weights (the norm) train apart, silently.
Ranks are seeded differently on purpose (torch's default seed differs per process anyway).
"""
import torch
from torch import nn

from multiproc import run_ranks


class DropBlock(nn.Module):
    """x + dropout(fc2(gelu(fc1(norm(x))))): Megatron's MLP with its hidden dropout on the
    replicated output, then a head."""

    def __init__(self, d=16):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop, self.head = nn.Dropout(0.3), nn.Linear(d, 3)

    def forward(self, x, y):
        h = x + self.drop(self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x)))))
        return nn.functional.cross_entropy(self.head(h), y)


def _body(rank, world):
    import zerofx

    torch.manual_seed(1000 + 17 * rank)  # each rank its own seed
    model = DropBlock()
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_clipping": 0.0,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "tensor_parallel": {"size": 2, "plan": {"fc1": "colwise", "fc2": "rowwise"}}}
    engine, *_ = zerofx.initialize(model=model, config=cfg)
    g = torch.Generator().manual_seed(5)  # one batch for both ranks (TP ranks share data)
    losses = []
    for _ in range(4):
        x, y = torch.randn(4, 16, generator=g), torch.randint(0, 3, (4,), generator=g)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    replicated = {n: p.detach().clone() for n, p in model.named_parameters()
                  if n.startswith(("norm", "head"))}
    return losses, replicated


def test_replicated_activations_drop_the_same_elements_on_every_tp_rank():
    (l0, p0), (l1, p1) = run_ranks(_body, 2)
    assert l0 == l1  # the loss is computed from the replicated activation on both ranks
    for n in p0:
        torch.testing.assert_close(p0[n], p1[n], rtol=0, atol=0, msg=n)
