"""checkpoint/sources.py: a load reads each saved range from the mapped shards that cover it,
without assembling the model's whole state; the reference is the assembly consolidation uses
(files.assemble + by_name), on generated layouts: parameters cut anywhere across ranges,
ranges of several ranks interleaved, padding between them."""
import random

import pytest
import torch

from zerofx.checkpoint.files import assemble, by_name
from zerofx.checkpoint.sources import RangeSource, WholeSource


def _layout(seed):
    rng = random.Random(seed)
    params, offset = [], 0
    for i in range(rng.randint(1, 6)):
        shape = [rng.randint(1, 7) for _ in range(rng.randint(1, 3))]
        numel = 1
        for d in shape:
            numel *= d
        params.append({"name": f"p{i}", "shape": shape, "offset": offset, "numel": numel})
        offset += numel + rng.randint(0, 3)  # alignment padding
    padded = offset + rng.randint(0, 5)
    cuts = sorted({0, padded, *(rng.randrange(padded) for _ in range(rng.randint(0, 8)))})
    ranks = rng.randint(1, 3)
    shards = [{"ranges": [], **{k: [] for k in ("master", "exp_avg")}} for _ in range(ranks)]
    for a, b in zip(cuts, cuts[1:]):  # each range to a random rank, after its other ranges
        s = shards[rng.randrange(ranks)]
        at = sum(len(v) for v in s["master"])
        s["ranges"].append([a, b - a, at])
        for k in ("master", "exp_avg"):
            s[k].append(torch.randn(b - a).tolist())
    for s in shards:
        for k in ("master", "exp_avg"):
            s[k] = torch.tensor([x for part in s[k] for x in part], dtype=torch.float32)
    return {"params": params, "padded_numel": padded}, shards, rng


@pytest.mark.parametrize("seed", range(40))
def test_ranges_read_from_the_shards_equal_the_assembled_state(seed):
    meta, shards, rng = _layout(seed)
    src = RangeSource(meta, shards)
    for key in ("master", "exp_avg"):
        whole = by_name(meta, assemble(meta, shards, key))
        ref = WholeSource({key: whole})
        for p in meta["params"]:
            assert torch.equal(src.whole(key, p["name"]), whole[p["name"]])
            start = rng.randrange(p["numel"])
            numel = rng.randint(0, p["numel"] - start)
            got, want = torch.full((numel,), float("nan")), torch.empty(numel)
            src.read(key, p["name"], start, numel, got)
            ref.read(key, p["name"], start, numel, want)
            assert torch.equal(got, want), (key, p["name"], start, numel)
