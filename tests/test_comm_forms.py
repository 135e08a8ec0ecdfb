"""Collective forms (zerofx/runtime/comm/forms.py): every form gives the native collective's
bits, the ranks agree on one form, and a pinned form trains exactly like the native one."""
import pytest
import torch

from models import make, mlp_batch
from multiproc import run_ranks


def _forms_body(rank, world, dtype):
    import torch.distributed as dist

    from zerofx.config import ConfigError
    from zerofx.runtime.comm import forms as cf
    from zerofx.runtime.comm.dist import init_distributed

    init_distributed()
    per = 1001  # odd: no form may rely on even pieces
    torch.manual_seed(rank)
    data = torch.randn(world * per).to(dtype)
    got = {}
    shm = cf.shm_comm.available(None, 1 << 20, torch.device("cpu"))  # one host, x86-64
    mirror = cf.shm_comm.ShmMirror(None, world * per, dtype, 1)
    for form in cf.candidates("reduce", world, shm):
        out = torch.empty(per, dtype=dtype)
        for _ in range(2):  # twice: the shm mirror's second round reuses its flags
            cf.start_reduce(form, data.clone(), out, None, mirror=mirror).wait()
        got["reduce", form] = out
    piece = data[:per].clone()
    for form in cf.candidates("gather", world, shm):
        out = torch.empty(world * per, dtype=dtype)
        for _ in range(2):
            cf.start_gather(form, piece, out, None, mirror=mirror).wait()
        got["gather", form] = out
    whole = data.clone()
    dist.all_reduce(whole)  # the reference: gloo's own sum
    choices = [cf.choose(role, None, world * per, dtype, shm=shm)
               for role in ("reduce", "gather")]
    try:
        refused = str(cf.choose("reduce", None, 10, dtype, pinned="p2p").form)
    except ConfigError as e:
        refused = str(e)
    return got, whole.view(world, per)[rank].clone(), piece, choices, refused, shm


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_every_form_gives_the_native_bits_and_the_ranks_agree(world):
    dtype = torch.bfloat16
    results = run_ranks(_forms_body, world, args=(dtype,))
    pieces = [r[2] for r in results]
    for rank, (got, reduced, _, choices, refused, shm) in enumerate(results):
        assert shm  # every rank on this host: the shared-memory forms are candidates
        # a pinned p2p reduce: taken at 2 ranks, refused by name at 4
        assert refused == "p2p" if world == 2 else "fastest" in refused, refused
        forms = {form for role, form in got if role == "reduce"}
        assert forms == ({"reduce_scatter", "all_reduce", "p2p", "shm"} if world == 2
                         else {"reduce_scatter", "all_reduce"})  # p2p, shm: another order
        assert ("gather", "shm") in got
        for (role, form), out in got.items():
            want = reduced if role == "reduce" else torch.cat(pieces)
            assert torch.equal(out, want), f"rank {rank}: {role} {form} differs"
        assert choices == results[0][3]  # one form per role, on every rank
        for c in choices:
            assert {f for f, _ in c.times_ms} == {f for r, f in got if r == c.role}
            assert c.form == min(c.times_ms, key=lambda ft: ft[1])[0]
            assert c.form in c.describe() and "ms" in c.describe()


def _train_body(rank, world, forms, variant="stage2"):
    import zerofx

    torch._dynamo.reset()
    model, _ = make("mlp")
    cfg = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, "bf16": {"enabled": True},
           "zero_optimization": {"stage": 2, "reduce_bucket_size": 300,
                                 "allgather_bucket_size": 500},
           "gradient_clipping": 0.5, "zerofx": forms}
    if variant == "stage1_lamb_fp16":  # the in-place update through LAMB, and skipped steps
        cfg.update(optimizer={"type": "Lamb", "params": {"lr": 1e-2}}, bf16={"enabled": False},
                   fp16={"enabled": True, "initial_scale_power": 18})
        cfg["zero_optimization"]["stage"] = 1
    if variant == "stage3":  # the graphs' bucket gathers too; biases kept whole
        cfg["zero_optimization"].update(stage=3, stage3_param_persistence_threshold=64)
    rt = zerofx.ZeroRuntime(model, cfg)
    compiled = torch.compile(model, backend="zero", options={"runtime": rt})
    for step in range(6):
        with rt.shape_carriers():
            loss = compiled(*mlp_batch(seed=10 * step + rank))
        rt.backward(loss)
        rt.step()
    if variant == "stage3":
        assert rt.comm.forms["param_gather"].form == rt.comm.forms["gather"].form
    return {n: p.detach().clone() for n, p in model.named_parameters()}, \
        {role: c.form for role, c in rt.comm.forms.items()}, int(rt.state.skipped)


def _all_forms(rank, world, variant):
    native = {"reduce_form": "reduce_scatter", "gather_form": "all_gather"}
    return [_train_body(rank, world, forms, variant) for forms in (
        native, *({"reduce_form": form if world == 2 else "reduce_scatter", "gather_form": form}
                  for form in ("p2p", "shm")))]


@pytest.mark.slow
@pytest.mark.parametrize("world,variant", [(2, "stage2"), (4, "stage1_lamb_fp16"),
                                           (2, "stage3")])
def test_p2p_and_shm_forms_train_bit_for_bit_like_the_native_collectives(world, variant):
    """Stage 2 with bf16 and clipping (2 ranks), stage 1 with fp16, overflow skips and LAMB
    (4 ranks), stage 3 (2 ranks; the graphs' bucket gathers in the form too): buckets reduced and shards gathered point-to-point or through shared memory
    (the update writing the flat parameters in place, the exchange filling the other ranks'
    rows there) leave every parameter exactly where gloo's reduce-scatter and all-gather
    do, over 6 steps (each shm round reuses the mirror's flags)."""
    for rank, ((native, f0, _), *others) in enumerate(
            run_ranks(_all_forms, world, args=(variant,))):
        assert f0["gather"] == "all_gather"
        for (params, forms, skips), form in zip(others, ("p2p", "shm")):
            assert forms["gather"] == form
            if "reduce" in forms:  # stage 2 (stage 1 all-reduces its full buffer)
                assert forms["reduce"] == (form if world == 2 else "reduce_scatter")
            if variant == "stage1_lamb_fp16":
                assert 1 <= skips < 6, skips  # some steps skipped on overflow, some applied
            for n in native:
                assert torch.equal(params[n], native[n]), f"rank {rank} {form}: {n}"
        init = make("mlp")[0].state_dict()
        assert any(not torch.equal(native[n], init[n].to(native[n].dtype))
                   for n in native)  # it trained


def _shm_refusals_body(rank, world):
    from zerofx.config import ConfigError
    from zerofx.runtime.comm import forms as cf, shm as shm_comm
    from zerofx.runtime.comm.dist import init_distributed

    init_distributed()
    cpu = torch.device("cpu")
    full = shm_comm._free_bytes
    shm_comm._free_bytes = lambda: 1 << 20  # a container's small /dev/shm
    try:
        small = shm_comm.available(None, 1 << 20, cpu)  # needs twice the buffers' bytes
    finally:
        shm_comm._free_bytes = full
    try:
        cf.choose("gather", None, 1000, torch.bfloat16, pinned="shm", shm=small)
        pinned = "taken"
    except ConfigError as e:
        pinned = str(e)
    shm_comm.SHM_DIR = "/nonexistent-zerofx-dir"
    try:
        shm_comm.ShmMirror(None, 1000, torch.bfloat16, 1)
        made = "made"
    except shm_comm.ShmError as e:
        made = str(e)
    return small, shm_comm.available(None, 1 << 20, torch.device("meta")), pinned, made


@pytest.mark.slow
def test_shm_form_is_not_offered_without_room_and_a_failed_mirror_is_one_clear_error():
    for small, meta, pinned, made in run_ranks(_shm_refusals_body, 2):
        assert small is False and meta is False  # no room in /dev/shm; not CPU tensors
        assert "'shm' is not a form" in pinned and "one x86-64 host" in pinned, pinned
        # on every rank, not only the one that tried to create the file
        assert "cannot share" in made and "--shm-size" in made and "p2p" in made, made


def _peer_exits_body(rank, world):
    import time

    from zerofx.runtime.comm import shm as shm_comm
    from zerofx.runtime.comm.dist import init_distributed

    init_distributed()
    mirror = shm_comm.ShmMirror(None, 64, torch.float32, 1)
    if rank == 1:
        return None  # leaves without its part of the round (its process then exits)
    t0 = time.monotonic()
    shm_comm.start_gather(mirror, 0, [(0, torch.zeros(64))])  # this rank's write
    try:
        mirror.wait_written(0)
        return "waited to the end", time.monotonic() - t0
    except shm_comm.ShmError as e:
        return str(e), time.monotonic() - t0


@pytest.mark.slow
def test_a_rank_waiting_on_a_peer_that_exited_fails_in_seconds():
    """gloo notices a closed socket within seconds; the shm form checks the pids it waits
    for instead of waiting out the 30-minute timeout."""
    message, waited = run_ranks(_peer_exits_body, 2, timeout_s=60)[0]
    assert "exited" in message and "rank 1" in message, message
    assert waited < 15, waited


def test_a_pinned_form_no_collective_takes_is_warned_about(caplog):
    from zerofx.config import Config
    from zerofx.runtime.comm.forms import Choice
    from zerofx.runtime.comm.context import _warn_unused_pins

    cfg = Config.from_dict({"zerofx": {"reduce_form": "shm", "gather_form": "p2p"}})
    with caplog.at_level("WARNING"):  # stage 1: a step gather, no bucket reduction
        _warn_unused_pins(cfg, {"gather": Choice("gather", "p2p", 10)})
    assert "zerofx.reduce_form 'shm' has no effect" in caplog.text
    assert "gather_form" not in caplog.text  # that pin is taken


def test_the_form_registry_is_the_one_list_of_forms():
    # a form is one Form in one registry: the config's choices, the candidates at 2 and 4
    # ranks and the cost model's kinds all follow from it
    from zerofx.comm_cost import DEFAULT
    from zerofx.runtime.comm import forms as cf

    for role in ("reduce", "gather"):
        names = [n for (r, n) in cf.REGISTRY if r == role]
        assert all(_pin_ok(role, n) for n in names + ["fastest"]), (role, names)
        assert not _pin_ok(role, "carrier_pigeon")
        assert cf.candidates(role, 2, shm=True) == tuple(names)  # natives first
        assert cf.candidates(role, 4, shm=False)[0] == names[0]
    assert cf.candidates("reduce", 4, shm=True) == ("reduce_scatter", "all_reduce")
    kinds = {f.kind for f in cf.REGISTRY.values()}
    assert kinds == {k for k, _ in DEFAULT.ms_per_mib}  # every form has a default rate


def _pin_ok(role, name) -> bool:
    from zerofx.config import Config, ConfigError

    try:
        Config.from_dict({"zerofx": {f"{role}_form": name}})
        return True
    except ConfigError:
        return False
