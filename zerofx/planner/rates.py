"""What each op of a traced graph costs on a device: its class, and the rates per class.

Classes (``op_class``), each priced by its own rate, per dtype where the CPU's kernels differ
(a bf16 tanh runs about a tenth as fast as an fp32 one here: no vectorised bf16 path):

    matmul         mm/addmm/bmm/convolution: FLOPs (torch's flop_counter formulas)
    attention      scaled-dot-product attention, forward; ``attention_bw`` its backward:
                   FLOPs at their own rates (a CPU's flash kernels reach a fraction of a GEMM's)
    copy           same-dtype copies, cat, clone, fills, pads: bytes read and written
    cast           dtype conversions (``_to_copy``): bytes, by the dtype written
    arith          add/mul/div/where/relu/pow and the other cheap elementwise ops (the default)
    transcendental tanh/exp/log/sigmoid/gelu/erf/silu/sin/cos/rsqrt/sqrt
    reduction      sum/mean/amax/norms of a vector
    softmax        softmax/log_softmax and their backward
    norm           layer_norm/rms_norm/group_norm and their backward
    index          embedding/index_select/gather/nll_loss; ``scatter`` the scatter-adds
                   (embedding_dense_backward, index_add, scatter_add)
    optimizer      the fused AdamW over a shard: seconds per element
    overhead       each op's dispatch from the graph's Python code: seconds per op
    fresh pages    a CPU's page faults and zeroing of memory touched anew: seconds per byte

``this-host``: each rate timed once per process (``host_rates``: about 1.5 s of CPU, on the
threads one rank gets) by a micro-benchmark of a representative op, independent of any
model: a linear layer's three 1024^3 GEMMs, causal attention over [1, 8, 512, 64], and on
vectors of 4 MiB of fp32 (16 of them cycled, as a step's activations stream from memory, and
each output freshly allocated) a clone, a cast, a multiply, a tanh, a row sum, a softmax, a
layer norm, an embedding lookup and its backward; zerofx's own fused Adam kernel; an FX
graph of tiny ops for the dispatch; writes to a fresh mapping against a resident one. Each
is the least CPU time of three calls on the calling thread (a busy host inflates it least).
The GPUs: data-sheet peaks times assumed efficiencies (``gpu_rates``), not measured.

``disk_rates(path)``: the write and read bandwidth of the filesystem under an offload's
nvme_path, timed once per path and process (about 0.1 s) as benchmarks/bench_offload.py
times it and the offload moves its state: 1 MiB pwrite/pread over a 64 MiB unlinked file
written once before, through the page cache (``direct=True``: O_DIRECT, the device past the
page cache, what a state larger than memory meets).
"""
from __future__ import annotations

import functools
import mmap
import os
import tempfile
import time
from dataclasses import dataclass

import torch
from torch import fx

aten = torch.ops.aten
CLASSES = ("matmul", "attention", "attention_bw", "copy", "cast", "arith", "transcendental",
           "reduction", "softmax", "norm", "index", "scatter")
_BY_NAME = {
    "attention": ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                  "_scaled_dot_product_cudnn_attention",
                  "_scaled_dot_product_flash_attention_for_cpu"),
    "copy": ("clone", "copy", "copy_", "cat", "stack", "fill", "fill_", "zeros", "zeros_like",
             "ones", "ones_like", "full", "full_like", "new_zeros", "new_ones", "new_full",
             "constant_pad_nd", "slice_scatter", "select_scatter", "lift_fresh_copy",
             "contiguous", "empty_like", "nll_loss_backward", "masked_fill", "tril", "triu"),
    "cast": ("_to_copy", "to"),
    "transcendental": ("tanh", "exp", "exp2", "expm1", "log", "log1p", "log2", "sigmoid",
                       "gelu", "gelu_backward", "erf", "erfinv", "silu", "silu_backward",
                       "sin", "cos", "rsqrt", "sqrt", "softplus", "mish", "elu", "atan",
                       "_safe_softmax_exp"),
    "reduction": ("sum", "mean", "amax", "amin", "max", "min", "var", "var_mean", "std",
                  "linalg_vector_norm", "norm", "prod", "argmax", "argmin", "any", "all",
                  "cumsum"),
    "softmax": ("_softmax", "_log_softmax", "_softmax_backward_data",
                "_log_softmax_backward_data", "_safe_softmax"),
    "norm": ("native_layer_norm", "native_layer_norm_backward", "_fused_rms_norm",
             "_fused_rms_norm_backward", "native_group_norm", "native_group_norm_backward",
             "native_batch_norm", "native_batch_norm_backward", "rms_norm"),
    "index": ("embedding", "index_select", "gather", "nll_loss_forward", "index", "take",
              "nll_loss2d_forward"),
    "scatter": ("embedding_dense_backward", "index_add", "index_add_", "scatter",
                "scatter_add", "scatter_add_", "index_put", "index_put_", "scatter_reduce",
                "_unsafe_index_put", "nll_loss2d_backward"),
}
_CLASS_OF = {name: cls for cls, names in _BY_NAME.items() for name in names}


def op_class(node: fx.Node, *, has_flops: bool) -> str:
    """The class of a call_function node (module doc); ``has_flops``: torch's flop counter
    has a formula for it (a matmul, or attention when named so)."""
    target = node.target
    name = getattr(getattr(target, "overloadpacket", None), "__name__", None) or \
        getattr(target, "__name__", str(target))
    if name.endswith("_backward") and name.removesuffix("_backward") in _BY_NAME["attention"]:
        return "attention_bw"
    cls = _CLASS_OF.get(name)
    if cls is not None:
        return cls
    return "matmul" if has_flops else "arith"


def counted_bytes(cls: str, out: list, inputs: list) -> int:
    """The bytes an op of class ``cls`` is priced by, from its output and input tensors (the
    same count for a traced node and for a calibration op): what it reads and writes, except
    a lookup (``index``), which reads only the rows it writes: twice its output plus its
    integer indices, not the whole table it gathers from."""
    size = sum(t.numel() * t.element_size() for t in out)
    if cls == "index":
        return 2 * size + sum(t.numel() * t.element_size() for t in inputs
                              if not t.dtype.is_floating_point)
    return size + sum(t.numel() * t.element_size() for t in inputs)


@dataclass(frozen=True)
class Rates:
    """A device's rates by op class (module doc)."""

    flops: dict  # (class, dtype) -> FLOP/s: matmul, attention, attention_bw
    bandwidth: dict  # (class, dtype) -> bytes/s of counted_bytes
    optimizer_s: float  # seconds per shard element of the fused AdamW step
    overhead_s: float  # seconds to dispatch one op
    source: str
    fresh_page_s: float = 0.0  # seconds per byte of first touching memory (page faults)
    # a GPU: the host dispatches while the device runs earlier kernels (only the device's
    # waits for the host cost time); a CPU: the same core does both, so they add
    async_dispatch: bool = False

    def rate(self, cls: str, dtype) -> float:
        """The rate of ``cls`` in ``dtype``; another dtype's rate of the class (fp32's
        first) when this one was not timed (an int64 add is priced as an fp32 one)."""
        table = self.flops if cls in _FLOP_CLASSES else self.bandwidth
        for key in ((cls, dtype), (cls, torch.float32)):
            if key in table:
                return table[key]
        for (c, _), r in table.items():
            if c == cls:
                return r
        raise KeyError(f"no rate for {cls} ops")

    def dispatch_seconds(self, works: list) -> float:
        """What dispatching a graph's ops (``works``: each op's seconds of work, in order)
        adds to their work: on a CPU every dispatch; with async dispatch, the time the
        device waits for the host (the host issues an op every ``overhead_s``, the device
        runs each once issued and the one before it is done)."""
        if not self.async_dispatch:
            return len(works) * self.overhead_s
        host = device = 0.0
        for work in works:
            host += self.overhead_s
            device = max(device, host) + work
        return device - sum(works)


_FLOP_CLASSES = ("matmul", "attention", "attention_bw")
_ELEMENTWISE = ("copy", "cast", "arith", "transcendental", "reduction", "softmax", "norm",
                "index", "scatter")

# GPU efficiencies (assumptions, not measured here): cuBLAS GEMMs reach about 60-70% of the
# dense peak, FlashAttention 2 about 35-50% forward and less backward; streaming elementwise
# kernels 70-80% of HBM bandwidth, reductions and normalisations a little less, gathers and
# scatter-adds (random rows, atomics) much less; an eager PyTorch op costs about 5-10 us to
# launch from Python.
GPU_EFFICIENCY = {"matmul": 0.6, "attention": 0.4, "attention_bw": 0.3}
GPU_BANDWIDTH_EFFICIENCY = {"copy": 0.7, "cast": 0.7, "arith": 0.7, "transcendental": 0.7,
                            "reduction": 0.6, "softmax": 0.6, "norm": 0.6, "index": 0.3,
                            "scatter": 0.2}
GPU_LAUNCH_S = 8e-6
OPTIMIZER_BYTES_PER_ELEMENT = 32  # fp32 master, moments read+written, grad read, bf16 written


def gpu_rates(bf16_tflops: float, fp32_tflops: float, hbm_tbs: float, source: str) -> Rates:
    """A GPU's rates from its data sheet (module doc): assumptions, not measured."""
    flops, bandwidth = {}, {}
    for dtype, peak in ((torch.bfloat16, bf16_tflops), (torch.float16, bf16_tflops),
                        (torch.float32, fp32_tflops)):
        for cls, eff in GPU_EFFICIENCY.items():
            flops[cls, dtype] = peak * 1e12 * eff
        for cls, eff in GPU_BANDWIDTH_EFFICIENCY.items():
            bandwidth[cls, dtype] = hbm_tbs * 1e12 * eff
    opt = OPTIMIZER_BYTES_PER_ELEMENT / (hbm_tbs * 1e12 * GPU_BANDWIDTH_EFFICIENCY["arith"])
    text = (f"{source} (assumed efficiencies): {bf16_tflops:g} TFLOPS bf16 x "
            f"{GPU_EFFICIENCY['matmul']}, {hbm_tbs:g} TB/s x 0.2-0.7 by op class, "
            f"{GPU_LAUNCH_S * 1e6:g} us per op")
    return Rates(flops, bandwidth, opt, GPU_LAUNCH_S, source=text, async_dispatch=True)


@functools.cache
def host_rates(dtype: torch.dtype, threads: int = 1) -> Rates:
    """This host's rates, timed once per process on ``threads`` threads (module doc): each
    class in fp32 and in ``dtype``."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flops, bandwidth = {}, {}
        dtypes = list(dict.fromkeys((torch.float32, dtype)))
        # a cast into one dtype reads the other (an fp32 job's casts: from bf16)
        others = {dt: next((o for o in dtypes if o != dt), torch.bfloat16) for dt in dtypes}
        pools = {dt: _pool(dt) for dt in {*dtypes, *others.values()}}
        for dt in dtypes:
            flops["matmul", dt] = _time_matmul(dt)
            other = others[dt]
            for cls in _ELEMENTWISE:
                bandwidth[cls, dt] = _time_class(cls, dt, pools, other)
        del pools
        fw, bw = _time_attention(dtype)
        flops["attention", dtype], flops["attention_bw", dtype] = fw, bw
        optimizer_s, overhead_s = _time_optimizer(dtype), _time_dispatch()
        fresh_s = _time_fresh_pages()
    finally:
        torch.set_num_threads(old)
    name = str(dtype).removeprefix("torch.")
    text = ", ".join(f"{c} {bandwidth[c, dtype] / 1e9:.1f}" for c in _ELEMENTWISE)
    return Rates(flops, bandwidth, optimizer_s, overhead_s, fresh_page_s=fresh_s, source=
                 f"timed here, {threads} thread(s): {name} matmul "
                 f"{flops['matmul', dtype] / 1e9:.0f} GFLOP/s, attention "
                 f"{fw / 1e9:.0f}/{bw / 1e9:.0f} (fw/bw); {name} GB/s: {text}; AdamW "
                 f"{optimizer_s * 1e9:.2f} ns/element; {overhead_s * 1e6:.1f} us per op; fresh "
                 f"pages {1e-9 / fresh_s if fresh_s else float('inf'):.1f} GB/s")


def _best(fn, reps: int = 3) -> float:
    """The least CPU time of ``reps`` calls (after one more): the calling thread's own time,
    which a busy host's other processes do not inflate as they do the wall time."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return max(min(times), 1e-9)


def _time_matmul(dtype, n: int = 1024) -> float:
    """FLOP/s of a linear layer's three GEMMs (forward x @ W^T, the input's gradient g @ W,
    the weight's g^T @ x: a transposed operand is slower), n tokens, n x n weight."""
    x, w, g = (torch.randn(n, n).to(dtype) for _ in range(3))
    reps = 3 if dtype.itemsize < 4 else 2  # fp32's take 10x as long on a CPU
    secs = sum(_best(fn, reps) for fn in (lambda: x @ w.t(), lambda: g @ w, lambda: g.t() @ x))
    return 3 * 2 * n ** 3 / secs


def _time_fresh_pages(nbytes: int = 32 << 20) -> float:
    """Seconds per byte a write to memory the process has not touched costs beyond a write
    to resident memory: the kernel's page fault and zeroing (an anonymous mapping, filled)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)

    def fresh():
        m = mmap.mmap(-1, nbytes)
        t = torch.frombuffer(m, dtype=torch.uint8)
        t.fill_(1)
        del t
        m.close()
    return max(0.0, _best(fresh) - _best(lambda: buf.fill_(1))) / nbytes


N_ELEMENTS, ROWS = 1 << 20, 1024  # 4 MiB of fp32 per tensor, as a layer's activations
# distinct inputs, cycled: 64+ MiB, as a step's activations, more than this host's caches
# give one core (the rates fall from 32 MiB to 128 MiB of inputs and outputs, and hold
# beyond: a multiply 27 -> 19 GB/s, a softmax 13.5 -> 9.3)
SETS = 16


def _pool(dtype) -> list:
    """SETS pairs of distinct 4 MiB-of-fp32 vectors in ``dtype``, values in [0.5, 1.5)."""
    base = torch.rand(N_ELEMENTS).add_(0.5).to(dtype)
    return [(base.clone(), base.clone()) for _ in range(SETS)]


def _time_class(cls: str, dtype, pools: dict, other) -> float:
    """Counted bytes per second of one representative op of ``cls`` in ``dtype``. As in a
    training step, each call reads tensors no cache holds (``SETS`` distinct inputs in
    turn, from ``pools``: dtype -> _pool) and allocates its output."""
    f = torch.nn.functional
    ids = torch.randint(0, 4 * ROWS, (4 * ROWS,))
    fn, args = {
        "copy": (torch.clone, lambda x, y: (x,)),
        "cast": (lambda w: w.to(dtype), None),
        "arith": (torch.mul, lambda x, y: (x, y)),
        "transcendental": (torch.tanh, lambda x, y: (x,)),
        "reduction": (lambda x: x.sum(-1), lambda x, y: (x.view(ROWS, -1),)),
        "softmax": (lambda x: torch.softmax(x, -1), lambda x, y: (x.view(ROWS, -1),)),
        "norm": (lambda x: f.layer_norm(x, (x.shape[1],)), lambda x, y: (x.view(ROWS, -1),)),
        # an embedding lookup of 4 x ROWS random rows of a table as large, and its backward
        "index": (f.embedding, lambda x, y: (ids, x.view(4 * ROWS, -1))),
        "scatter": (lambda g, i: aten.embedding_dense_backward(g, i, 4 * ROWS, -1, False),
                    lambda x, y: (x.view(4 * ROWS, -1), ids)),
    }[cls]
    sets = [(w,) for w, _ in pools[other]] if args is None else \
        [args(x, y) for x, y in pools[dtype]]

    def run():
        for a in sets:
            fn(*a)
    return counted_bytes(cls, _flat(fn(*sets[0])), list(sets[0])) * SETS / _best(run)


def _flat(out) -> list:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _time_attention(dtype, shape=(1, 8, 512, 64)) -> tuple[float, float]:
    """FLOP/s of causal scaled-dot-product attention, forward and backward, counted by the
    formulas graphs.py prices the traced nodes with."""
    from torch.utils.flop_counter import sdpa_backward_flop, sdpa_flop

    q, k, v = (torch.randn(shape).to(dtype).requires_grad_() for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = sdpa(q, k, v, is_causal=True)
    grad = torch.ones_like(out)
    fw = _best(lambda: sdpa(q, k, v, is_causal=True))
    both = _best(lambda: torch.autograd.grad(sdpa(q, k, v, is_causal=True), (q, k, v), grad))
    fw_flops = sdpa_flop(q, k, v, out_val=out)
    bw_flops = sdpa_backward_flop(grad, q, k, v, out, None, out_val=(q, k, v))
    return fw_flops / fw, bw_flops / max(both - fw, 0.1 * both)


def _time_optimizer(dtype, n: int = N_ELEMENTS) -> float:
    """Seconds per element of zerofx's fused AdamW (its C++ kernel, or the fallback the
    runtime would run too), fp32 shard, gradient and copy out in ``dtype``."""
    from zerofx.runtime.fused_optim import adam_step_

    p, m, v = torch.rand(n), torch.zeros(n), torch.zeros(n)
    g, out = torch.rand(n).to(dtype), torch.empty(n, dtype=dtype)
    return _best(lambda: adam_step_(p, g, m, v, lr=1e-4, step=1, param_out=out)) / n


def _time_dispatch(ops: int = 200) -> float:
    """Seconds per node of an FX graph of tiny ops (adds and views on four elements), run
    as the runtime runs its graphs: the generated Python calling aten ops."""
    g = fx.Graph()
    x = last = g.placeholder("x")
    for i in range(ops // 2):
        last = g.call_function(aten.add.Tensor, (last, x))
        last = g.call_function(aten.view.default, (last, [4]))
    g.output(last)
    gm = fx.GraphModule(torch.nn.Module(), g)
    t = torch.ones(4)
    return _best(lambda: gm(t), reps=5) / ops


@functools.lru_cache(maxsize=None)
def disk_rates(path: str, *, direct: bool = False, nbytes: int = 64 << 20,
               chunk: int = 1 << 20) -> tuple[float, float]:
    """(write, read) bytes/s of the filesystem under ``path`` (module doc), measured once
    per process."""
    return measure_disk(path, nbytes, chunk, direct=direct)


def measure_disk(path: str, nbytes: int, chunk: int, *, direct: bool) -> tuple[float, float]:
    """(write, read) bytes/s of ``nbytes`` through one file under ``path``, in ``chunk``
    calls (benchmarks/bench_offload.py measures its limit with it too)."""
    chunk = max(mmap.PAGESIZE, chunk // mmap.PAGESIZE * mmap.PAGESIZE)
    nbytes = max(nbytes, chunk)  # less than one chunk: time one chunk
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(min(chunk, 1 << 20)) * (chunk // min(chunk, 1 << 20)))
    fd, name = tempfile.mkstemp(dir=path, prefix="zerofx-disk-")
    os.unlink(name)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        if direct:
            fd2 = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_DIRECT)
            os.close(fd)
            fd = fd2
        offsets = range(0, nbytes - chunk + 1, chunk)
        for off in offsets:  # once untimed: the offload rewrites a file written before
            os.pwrite(fd, buf, off)
        t0 = time.perf_counter()
        for off in offsets:
            os.pwrite(fd, buf, off)
        if direct:
            os.fsync(fd)
        w = time.perf_counter() - t0
        t0 = time.perf_counter()
        for off in offsets:
            os.preadv(fd, [buf], off)
        r = time.perf_counter() - t0
    finally:
        os.close(fd)
    done = nbytes // chunk * chunk
    return done / w, done / r
