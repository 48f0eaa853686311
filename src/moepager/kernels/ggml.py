"""llama.cpp's own CPU kernels (ggml, from the libggml-python wheel), called through ctypes.

Owns the products of GGUF block-quantized weights, computed exactly as llama.cpp computes them: the
activations are quantized once per call to the weight type's dot-product partner (Q8_0 for Q4_0..Q8_0,
Q8_K for the K-quants), and integer dot products run in ggml's SIMD kernels. Three calls:
- `mul_mat_id(qtype, bank, x, ids)`: a MoE layer's routed experts in one call (ggml's mul_mat_id), over a
  bank uint8 [S, R, row bytes] (slots may lie further apart than a matrix: a cache sizes slots for the
  largest layer) for the (token, slot) pairs ids [N, K]; decode and prefill alike (ggml groups the tokens
  of each expert itself);
- `mul_mat(qtype, w, x)`: a dense matrix (attention, shared experts, output head);
- `dequantize(qtype, raw)`: ggml's own to_float, for embedding rows and checks.
Each product is a ggml graph of one node over tensors whose data pointers are the torch tensors' own memory
(nothing is copied or repacked). Graphs are cached per shape, so a decode step patches three pointers and
calls ggml_graph_compute. It does not own which slots a layer uses (the experts primitive) or where the
bytes come from (the store).

Threads: a thread that computes GGUF blocks gives its cores to ggml's pool, whose threads spin briefly between
calls as llama.cpp's do (or sleep, once experts are paged: see _poll), and runs torch's ops in between on
itself alone (torch's OpenMP workers would otherwise spin on the same cores). Products of under SMALL_WORK
bytes run on the calling thread. Measured on a 4-layer Qwen3-30B-A3B-shaped Q4_K_M file, decode on 2
shared cores: torch 2 + ggml 2 threads 3-8 tok/s, torch 1 + ggml 1 24, torch 1 + ggml 2 spinning 40.

Letters: S slots, R rows (outputs), C columns (inputs), N tokens, K matrices per token.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import time
from collections import OrderedDict

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .thread_choice import ThreadChoice

Q = GGMLQuantizationType
F32, I32 = 0, 26  # ggml_type values of the activations and the ids
# the block types moepager computes compact (llama.cpp's "quantized" types a GGUF holds for its matrices)
SUPPORTED: frozenset[int] = frozenset(
    {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.MXFP4}
)
MUL_MAT_TYPES: frozenset[int] = SUPPORTED | {Q.F16}  # dense products also take fp16 rows
_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_MAX_THREADS = 512  # GGML_MAX_N_THREADS, the size of the thread pool's cpu mask
# struct ggml_tensor (ggml.h, ggml 0.20): type, buffer, ne[4], nb[4], op, op_params[16], flags, src[10],
# view_src, view_offs, then data. Checked against ggml_get_data when the library loads.
_NB_OFFSET = 48
_DATA_OFFSET = 248
_CACHED_GRAPHS = 256  # graphs kept per process: every (matrix, tokens) shape of a few decode batch sizes
# ggml's polling level between calls: 0 sleeps at once, 50 (llama.cpp's default) spins a while. Spinning wins
# when the model is resident; a process that pages experts sleeps, so its reader threads get the cores
# (benchmarks/real_scale.md: at a 4 GiB cap on a busy machine, 2 threads decoded 0.71 tok/s spinning and 1.54
# sleeping; on a quiet one 3.1 and 2.9)
_poll = 50
_NODES = 16  # tensors a graph's context holds (swiglu_experts: 9)
SMALL_WORK = 1 << 20  # weight bytes below which a product runs on the calling thread alone


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", _P), ("no_alloc", ctypes.c_bool)]


class _CPlan(ctypes.Structure):
    _fields_ = [
        ("work_size", ctypes.c_size_t),
        ("work_data", _P),
        ("n_threads", ctypes.c_int),
        ("threadpool", _P),
        ("abort_callback", _P),
        ("abort_callback_data", _P),
        ("use_ref", ctypes.c_bool),
    ]


class _PoolParams(ctypes.Structure):
    _fields_ = [
        ("cpumask", ctypes.c_bool * _MAX_THREADS),
        ("n_threads", ctypes.c_int),
        ("prio", ctypes.c_int),
        ("poll", ctypes.c_uint32),
        ("strict_cpu", ctypes.c_bool),
        ("paused", ctypes.c_bool),
    ]


class _ToFloat(ctypes.Structure):  # struct ggml_type_traits's leading fields
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", _I64),
        ("blck_size_interleave", _I64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.CFUNCTYPE(None, _P, _P, _I64)),
    ]


def _signatures(base: ctypes.CDLL, cpu: ctypes.CDLL) -> None:
    for lib, name, res, args in [
        (base, "ggml_init", _P, [_InitParams]),
        (base, "ggml_free", None, [_P]),
        (base, "ggml_new_tensor_3d", _P, [_P, ctypes.c_int, _I64, _I64, _I64]),
        (base, "ggml_new_tensor_2d", _P, [_P, ctypes.c_int, _I64, _I64]),
        (base, "ggml_mul_mat", _P, [_P, _P, _P]),
        (base, "ggml_mul_mat_id", _P, [_P, _P, _P, _P]),
        (base, "ggml_swiglu_split", _P, [_P, _P, _P]),
        (base, "ggml_new_graph_custom", _P, [_P, ctypes.c_size_t, ctypes.c_bool]),
        (base, "ggml_build_forward_expand", None, [_P, _P]),
        (base, "ggml_get_data", _P, [_P]),
        (base, "ggml_tensor_overhead", ctypes.c_size_t, []),
        (base, "ggml_graph_overhead_custom", ctypes.c_size_t, [ctypes.c_size_t, ctypes.c_bool]),
        (base, "ggml_get_type_traits", ctypes.POINTER(_ToFloat), [ctypes.c_int]),
        (base, "ggml_threadpool_params_default", _PoolParams, [ctypes.c_int]),
        (cpu, "ggml_cpu_init", None, []),
        (cpu, "ggml_graph_plan", _CPlan, [_P, ctypes.c_int, _P]),
        (cpu, "ggml_graph_compute", ctypes.c_int, [_P, ctypes.POINTER(_CPlan)]),
        (cpu, "ggml_threadpool_new", _P, [ctypes.POINTER(_PoolParams)]),
    ]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


class _Ggml:
    """The two libraries, loaded once, and one thread pool per thread count."""

    def __init__(self):
        import libggml  # the prebuilt libraries ship in this wheel; imported only when a GGUF is computed

        where = os.path.join(os.path.dirname(libggml.__file__), "lib64")
        self.base = ctypes.CDLL(os.path.join(where, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
        self.cpu = ctypes.CDLL(os.path.join(where, "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
        _signatures(self.base, self.cpu)
        self.cpu.ggml_cpu_init()
        self.pools: dict[tuple[int, int], int] = {}
        self.lock = threading.Lock()  # one graph computes at a time: graphs and pools are shared
        self._check_layout()

    def _check_layout(self) -> None:
        ctx = self.base.ggml_init(_InitParams(self.base.ggml_tensor_overhead() * 2, None, True))
        try:
            t = self.base.ggml_new_tensor_2d(ctx, F32, 32, 3)
            _set_data(t, 0x1000)
            nb = (ctypes.c_size_t * 2).from_address(t + _NB_OFFSET)
            if self.base.ggml_get_data(t) != 0x1000 or tuple(nb) != (4, 128):
                raise RuntimeError("libggml's struct ggml_tensor is not the layout moepager was written for")
        finally:
            self.base.ggml_free(ctx)

    def pool(self, threads: int, poll: int) -> int:
        if (threads, poll) not in self.pools:
            params = self.base.ggml_threadpool_params_default(threads)
            params.poll = poll
            self.pools[threads, poll] = self.cpu.ggml_threadpool_new(ctypes.byref(params))
        return self.pools[threads, poll]


_lib: _Ggml | None = None
_lib_lock = threading.Lock()


def _ggml() -> _Ggml:
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _Ggml()
    return _lib


def _set_data(tensor: int, ptr: int) -> None:
    ctypes.c_void_p.from_address(tensor + _DATA_OFFSET).value = ptr


class _Graph:
    """One product as a ggml graph: its tensors' data pointers are patched at each call."""

    def __init__(self, build, threads: int, measured: int):
        g = self.g = _ggml()
        # weight bytes a call counts toward choosing the thread count (0: not measured)
        self.threads, self.measured = threads, measured
        size = g.base.ggml_tensor_overhead() * _NODES + g.base.ggml_graph_overhead_custom(_NODES, False)
        self.ctx = g.base.ggml_init(_InitParams(size, None, True))
        # inputs and output are patched per call; intermediate nodes (if any) get buffers of their own here
        self.inputs, self.out, *scratch = build(g.base, self.ctx)
        self.scratch = scratch[0] if scratch else []
        self.graph = g.base.ggml_new_graph_custom(self.ctx, _NODES, False)
        g.base.ggml_build_forward_expand(self.graph, self.out)
        self.plan = g.cpu.ggml_graph_plan(self.graph, threads, g.pool(threads, _poll))
        self.work = torch.empty(self.plan.work_size + 64, dtype=torch.uint8)
        self.plan.work_data = self.work.data_ptr()

        # the data pointer fields patched per call (inputs, then the output), and the call's fixed arguments
        self.fields = [ctypes.c_void_p.from_address(t + _DATA_OFFSET) for t in (*self.inputs, self.out)]
        self.compute = functools.partial(g.cpu.ggml_graph_compute, self.graph, ctypes.byref(self.plan))

    def __call__(self, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        with self.g.lock:  # the pointers too: another thread may run this same graph on its own tensors
            for field, x in zip(self.fields, (*inputs, out)):
                field.value = x.data_ptr()
            start = time.perf_counter()
            status = self.compute()
            seconds = time.perf_counter() - start
        if status != 0:
            raise RuntimeError(f"ggml_graph_compute failed with status {status}")
        if self.measured:
            _choice().record(self.threads, self.measured, seconds)
        return out

    def __del__(self):
        if getattr(self, "ctx", None):
            self.g.base.ggml_free(self.ctx)


_graphs: OrderedDict[tuple, _Graph] = OrderedDict()
_cores = threading.local()  # per calling thread (torch's thread count is per thread): ggml's share


def _choice() -> ThreadChoice:
    """The calling thread's choice between the cores torch had when it first computed a block product
    (torch.set_num_threads before that sets them) and one thread, by measured speed (kernels/thread_choice.py)."""
    if getattr(_cores, "choice", None) is None:
        _cores.choice = ThreadChoice(torch.get_num_threads())
    return _cores.choice


def _threads() -> int:
    """ggml's thread count for the calling thread's next large product; torch's own ops here run on one."""
    choice = _choice()
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
        _release_openmp_workers()
    return choice.current


def _release_openmp_workers() -> None:
    """End the OpenMP worker threads this thread's earlier torch ops started. Idle, they wait for the next
    parallel region, spinning under OMP_WAIT_POLICY=ACTIVE, on the very cores ggml's pool computes on: a
    resident Q4_0 decode on 2 cores ran three busy threads, the OpenMP one doing nothing, at 26-29 ms a token
    where it runs 11-12 without it (benchmarks/README.md section 4). omp_pause_resource_all (OpenMP 5) ends
    them; torch starts new ones if this thread gives it more threads again."""
    pause = _openmp_pause()
    if pause is not None:
        pause(1)  # omp_pause_soft


@functools.cache
def _openmp_pause():
    """omp_pause_resource_all of the OpenMP runtime torch runs on (GNU libgomp in its CPU wheels), if any."""
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    with open("/proc/self/maps") as maps:  # torch's own copy: other wheels bring theirs (e.g. sentencepiece)
        paths = sorted(
            {p for p in (line.split()[-1] for line in maps) if p.startswith(torch_lib) and "omp" in p}
        )
    for path in paths:
        pause = getattr(ctypes.CDLL(path), "omp_pause_resource_all", None)
        if pause is not None:
            pause.restype, pause.argtypes = ctypes.c_int, [ctypes.c_int]
            return pause
    return None


def sleep_between_calls() -> None:
    """Let ggml's threads sleep between products from now on (a process that reads experts from disk)."""
    global _poll
    _poll = 0


def _graph(key: tuple, build, work_bytes: int, tokens: int, check) -> _Graph:
    """The cached graph of `key`, run on ggml's threads, or on the calling thread alone for a product that
    reads less than SMALL_WORK bytes of weights (waking a pool costs more than it saves there). `check()`
    validates the arguments when the graph is built: a key holds every pointer, shape and stride it checked,
    so a cached graph's arguments passed it already (a decode step pays no checks). The thread count is
    chosen by the speed of one-token products (a sequence's decode step: like for like from window to window)."""
    threads = _threads() if work_bytes >= SMALL_WORK else 1
    key = (*key, threads, _poll)
    graph = _graphs.get(key)
    if graph is None:
        check()
        measured = work_bytes if work_bytes >= SMALL_WORK and tokens == 1 else 0
        graph = _graphs[key] = _Graph(build, threads, measured)
        if len(_graphs) > _CACHED_GRAPHS:
            _graphs.popitem(last=False)
    else:
        _graphs.move_to_end(key)
    return graph


def _weights(base, ctx, qtype: int, w: torch.Tensor) -> int:
    """A ggml tensor over w uint8 [S, R, row bytes] (any stride between slots), ne = [C, R, S]."""
    s, r, rb = w.shape
    qk, bb = GGML_QUANT_SIZES[Q(qtype)]
    t = base.ggml_new_tensor_3d(ctx, qtype, rb // bb * qk, r, s)
    (ctypes.c_size_t * 3).from_address(t + _NB_OFFSET + 8)[:] = [rb, w.stride(0), w.stride(0) * s]
    _set_data(t, w.data_ptr())
    return t


def _check_type(qtype: int, allowed: frozenset[int] = SUPPORTED) -> None:
    if qtype not in allowed:
        name = Q(qtype).name if qtype in Q._value2member_map_ else qtype
        names = ", ".join(Q(t).name for t in sorted(allowed))
        raise ValueError(f"GGUF quantization type {name} has no moepager kernel (supported: {names})")


def _check(qtype: int, w: torch.Tensor, inputs: list[int], allowed: frozenset[int] = SUPPORTED) -> None:
    """w: uint8 rows on the CPU of `qtype`, whose width takes inputs of shape `inputs` (its last is C)."""
    _check_type(qtype, allowed)
    if w.dtype != torch.uint8 or w.device.type != "cpu" or w.stride(-1) != 1 or w.stride(-2) != w.shape[-1]:
        raise ValueError(f"GGUF weights must be uint8 rows on the CPU, not {w.dtype} {list(w.shape)}")
    qk, bb = GGML_QUANT_SIZES[Q(qtype)]
    if w.shape[-1] % bb or inputs[-1] != w.shape[-1] // bb * qk:
        raise ValueError(f"{Q(qtype).name} rows of {w.shape[-1]} bytes do not take inputs {list(inputs)}")


def _slots(ids: torch.Tensor, bank_size: int) -> torch.Tensor:
    """ids [N, K] as ggml's int32, each checked to lie in the bank (a bad one would read outside it)."""
    ids32 = ids.to(torch.int32).contiguous()
    flat = ids32.view(-1).tolist()  # one host read: cheaper here than two reductions and their syncs
    if flat and (min(flat) < 0 or max(flat) >= bank_size):
        raise IndexError(f"a slot is outside the bank of {bank_size}")
    return ids32


def _activations(x: torch.Tensor) -> torch.Tensor:
    """x as float32 rows, contiguous (a no-op for the float32 activations of a decode step)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    return x.detach()


def mul_mat_id(qtype: int, bank: torch.Tensor, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """bank uint8 [S, R, row bytes], x float32 [N, C] or [N, K, C], ids [N, K] -> float32 [N, K, R]:
    out[n, k] = bank[ids[n, k]] @ x[n] (or x[n, k]), as llama.cpp computes it."""
    n, k = ids.shape
    s, r, _ = bank.shape
    x = _activations(x)
    used = 1 if x.dim() == 2 else k  # inputs per token: shared by its K experts, or one each
    c = x.shape[-1]

    def check():
        _check(qtype, bank, list(x.shape))
        if x.shape[:-1] not in ((n,), (n, k)):
            raise ValueError(f"inputs {list(x.shape)}: not [N, C] or [N, K, C] for ids {list(ids.shape)}")

    def build(base, ctx):
        a = _weights(base, ctx, qtype, bank)
        b = base.ggml_new_tensor_3d(ctx, F32, c, used, n)
        i = base.ggml_new_tensor_2d(ctx, I32, k, n)
        return (b, i), base.ggml_mul_mat_id(ctx, a, b, i)

    key = ("id", qtype, bank.data_ptr(), bank.dtype, bank.shape, bank.stride(), x.shape, k)
    graph = _graph(key, build, min(n * k, s) * r * bank.shape[-1], n, check)
    return graph(torch.empty(n, k, r, dtype=torch.float32), x, _slots(ids, s))


def swiglu_experts(
    types: tuple[int, int, int], banks: tuple, x: torch.Tensor, ids: torch.Tensor
) -> torch.Tensor:
    """A SwiGLU MoE layer's routed experts in one graph, as llama.cpp's build_moe_ffn computes them: gate and
    up banks [S, I, row bytes], down [S, D, row bytes] of `types`, x float32 [N, D], ids [N, K] ->
    [N, K, D] = down(silu(gate x) * up x) per (token, slot) pair. One call wakes the pool once for the layer."""
    gate, up, down = banks
    n, k = ids.shape
    s, i_ff, d = gate.shape[0], gate.shape[1], down.shape[1]
    x = _activations(x)

    def check():
        for qtype, bank, inputs in zip(types, banks, (list(x.shape), list(x.shape), [i_ff])):
            _check(qtype, bank, inputs)
        if up.shape[:2] != gate.shape[:2] or down.shape[0] != s or x.shape[0] != n:
            raise ValueError(f"gate {list(gate.shape)}, up {list(up.shape)}, down {list(down.shape)} and inputs "
                             f"{list(x.shape)} are not one SwiGLU bank for ids {list(ids.shape)}")  # fmt: skip

    def build(base, ctx):
        a_gate, a_up, a_down = (_weights(base, ctx, q, b) for q, b in zip(types, banks))
        b = base.ggml_new_tensor_3d(ctx, F32, x.shape[1], 1, n)
        i = base.ggml_new_tensor_2d(ctx, I32, k, n)
        g, u = base.ggml_mul_mat_id(ctx, a_gate, b, i), base.ggml_mul_mat_id(ctx, a_up, b, i)  # [I, K, N]
        h = base.ggml_swiglu_split(ctx, g, u)
        scratch = [torch.empty(n, k, i_ff, dtype=torch.float32) for _ in range(3)]  # g, u, h
        for node, buf in zip((g, u, h), scratch):
            _set_data(node, buf.data_ptr())
        return (b, i), base.ggml_mul_mat_id(ctx, a_down, h, i), scratch  # [D, K, N]

    key = ("glu", types, *((t.data_ptr(), t.dtype, t.shape, t.stride()) for t in banks), x.shape, k)
    work = min(n * k, s) * (gate.shape[1] * gate.shape[2] * 2 + down.shape[1] * down.shape[2])
    graph = _graph(key, build, work, n, check)
    return graph(torch.empty(n, k, d, dtype=torch.float32), x, _slots(ids, s))


def mul_mat(qtype: int, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """w uint8 [R, row bytes], x float32 [N, C] -> float32 [N, R] = x @ w.T, as llama.cpp computes it. Batched:
    w [H, R, row bytes] and x [H, N, C] -> [H, N, R], matrix h on inputs h (MLA's per-head k_b and v_b).
    Besides the block types, w may be F16 (rows llama.cpp's quantizer could not cut into blocks), whose
    products round x to fp16 as ggml's do."""
    x = _activations(x)
    batched = w.dim() == 3

    def check():
        _check(qtype, w, list(x.shape), allowed=MUL_MAT_TYPES)
        if x.dim() != w.dim() or (batched and x.shape[0] != w.shape[0]):
            raise ValueError(f"inputs {list(x.shape)} for weights {list(w.shape)}: not [N, C] or [H, N, C]")

    def build(base, ctx):
        a = _weights(base, ctx, qtype, w if batched else w[None])
        if batched:
            b = base.ggml_new_tensor_3d(ctx, F32, x.shape[2], x.shape[1], x.shape[0])
        else:
            b = base.ggml_new_tensor_2d(ctx, F32, x.shape[1], x.shape[0])
        return (b,), base.ggml_mul_mat(ctx, a, b)

    key = ("mm", qtype, w.data_ptr(), w.dtype, w.shape, w.stride(), x.shape)
    graph = _graph(key, build, w.numel() * w.element_size(), x.shape[-2], check)
    return graph(torch.empty(*x.shape[:-1], w.shape[-2], dtype=torch.float32), x)


def dequantize(qtype: int, raw: torch.Tensor) -> torch.Tensor:
    """raw uint8 [..., R, row bytes] -> float32 [..., R, C], by ggml's own to_float."""
    _check_type(qtype)
    qk, bb = GGML_QUANT_SIZES[Q(qtype)]
    if raw.dtype != torch.uint8 or raw.shape[-1] % bb:
        raise ValueError(f"{Q(qtype).name} rows must be uint8 [..., k * {bb} bytes], not {list(raw.shape)}")
    raw = raw.contiguous()
    out = torch.empty(*raw.shape[:-1], raw.shape[-1] // bb * qk, dtype=torch.float32)
    if out.numel():
        _ggml().base.ggml_get_type_traits(qtype).contents.to_float(
            raw.data_ptr(), out.data_ptr(), out.numel()
        )
    return out
