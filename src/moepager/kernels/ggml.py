"""llama.cpp's own CPU kernels (ggml, the library kernels/ggml_library.py loads), called through ctypes.

Owns the products of GGUF block-quantized weights, computed exactly as llama.cpp computes them: the
activations are quantized once per call to the weight type's dot-product partner (Q8_0 for Q4_0..Q8_0,
Q8_K for the K-quants), and integer dot products run in ggml's SIMD kernels. The calls:
- `mul_mat_id(qtype, bank, x, ids)`: a MoE layer's routed experts in one call (ggml's mul_mat_id), over a
  bank uint8 [S, R, row bytes] (slots may lie further apart than a matrix: a cache sizes slots for the
  largest layer) for the (token, slot) pairs ids [N, K]; decode and prefill alike (ggml groups the tokens
  of each expert itself);
- `mul_mat(qtype, w, x)`: a dense matrix (attention, shared experts, output head);
- `swiglu_mlp(types, mats, x)`: a dense SwiGLU feed-forward as one graph (llama.cpp's build_ffn);
- `dequantize(qtype, raw)`: ggml's own to_float, for embedding rows and checks.
The float ops between the products, as llama.cpp runs them, are in kernels/ggml_float.py.
Each product is a ggml graph of one node over tensors whose data pointers are the torch tensors' own memory
(nothing is copied; weights are in llama.cpp's interleaved layout where llama.cpp would use it,
kernels/ggml_repack.py). Graphs are cached per shape, so a decode step patches three pointers and calls
ggml_graph_compute. It does not own which slots a layer uses (the experts primitive) or where the
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
from gguf import GGML_QUANT_SIZES

from .ggml_library import DATA_OFFSET, F32, I32, InitParams, Q, library, set_data, set_strides
from .ggml_repack import mark
from .thread_choice import ThreadChoice

# the block types moepager computes compact (llama.cpp's "quantized" types a GGUF holds for its matrices)
SUPPORTED: frozenset[int] = frozenset(
    {Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.MXFP4}
)
# products also take float rows: fp16 (activations rounded to fp16, as llama.cpp's are) and float32 (a float32
# GGUF computed as llama.cpp computes it; router logits as llama.cpp takes them)
MUL_MAT_TYPES: frozenset[int] = SUPPORTED | {Q.F16, Q.F32}
# graphs kept per process, by count and by the bytes of their buffers. A decode step calls each of ~6 graphs per
# layer (a matrix's graph is its own): a 48-layer model's steps need ~290, and at 256 the least recently used
# was always the next one needed, so every graph was rebuilt every token (~20 ms of a 400 ms token). The
# byte bound keeps few of a long prefill chunk's graphs (a 512-token SwiGLU layer's buffers are ~100 MiB)
_CACHED_GRAPHS = 2048
_CACHED_GRAPH_BYTES = 64 << 20
# ggml's polling level between calls: 0 sleeps at once, 50 (llama.cpp's default) spins a while. Spinning wins
# when the model is resident; a process that pages experts sleeps, so its reader threads get the cores
# (benchmarks/real_scale.md: at a 4 GiB cap on a busy machine, 2 threads decoded 0.71 tok/s spinning and 1.54
# sleeping; on a quiet one 3.1 and 2.9)
_poll = 50
_NODES = 16  # tensors a graph's context holds at least (swiglu_experts: 2K + 12)
SMALL_WORK = 1 << 20  # weight bytes below which a product runs on the calling thread alone


class _Graph:
    """One product as a ggml graph: its tensors' data pointers are patched at each call. Built once whatever
    the thread count: a count's plan (its work size and thread pool) is made when a call first asks for it
    (a step graph of a small model took ~5 ms to build; a plan, microseconds)."""

    def __init__(self, build, measured: int, nodes: int = 0):
        g = self.g = library()
        nodes = max(nodes, _NODES)
        # weight bytes a call counts toward choosing the thread count (0: not measured)
        self.measured = measured
        size = g.base.ggml_tensor_overhead() * nodes + g.base.ggml_graph_overhead_custom(nodes, False)
        self.ctx = g.base.ggml_init(InitParams(size, None, True))
        # inputs and output are patched per call; intermediate nodes (if any) get buffers of their own here.
        # Nodes whose results no output reads (writes into a cache) come fourth: expanded first, they run
        # before the nodes that read what they wrote (ggml runs a graph's nodes in the order they were added)
        self.inputs, self.out, *rest = build(g.base, self.ctx)
        self.scratch = rest[0] if rest else []
        self.graph = g.base.ggml_new_graph_custom(self.ctx, nodes, False)
        outs = self.out if isinstance(self.out, tuple) else (self.out,)  # a graph may have several outputs
        for out in (*(rest[1] if len(rest) > 1 else ()), *outs):
            g.base.ggml_build_forward_expand(self.graph, out)
        self.nbytes = sum(t.numel() * t.element_size() for t in self.scratch)
        self.plans: dict[tuple[int, int], tuple] = {}  # (threads, polling) -> (plan, compute)
        self.on = None

        # the data pointer fields patched per call (inputs, then the output)
        self.fields = [ctypes.c_void_p.from_address(t + DATA_OFFSET) for t in (*self.inputs, *outs)]

    def run_on(self, threads: int) -> None:
        """Compute the next calls on `threads` threads (with the polling level set now). Two calling threads
        that choose different counts may swap plans between this and the call: a count changes speed only."""
        if self.on == (threads, _poll):
            return
        self.on = threads, _poll
        if self.on not in self.plans:
            plan = self.g.cpu.ggml_graph_plan(self.graph, threads, self.g.pool(threads, _poll))
            compute = functools.partial(self.g.cpu.ggml_graph_compute, self.graph, ctypes.byref(plan))
            self.plans[self.on] = plan, compute
        self.threads = threads
        self.plan, self.compute = self.plans[self.on]

    def replan(self) -> None:
        """Plan again at the current count after nodes changed their extent (a plan's work size follows it)."""
        threads, self.on = self.threads, None
        self.plans.clear()
        self.run_on(threads)

    def __call__(self, out, *inputs: torch.Tensor | int):
        """Computes into out (a tensor, or a tuple of them for a graph of several outputs) and returns it. An
        input is a tensor or an address."""
        outs = out if isinstance(out, tuple) else (out,)
        with self.g.lock:  # the pointers too: another thread may run this same graph on its own tensors
            for field, x in zip(self.fields, (*inputs, *outs)):
                field.value = x if type(x) is int else x.data_ptr()
            self.plan.work_data = _work(self.plan.work_size)
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


# one work buffer for every graph (graphs compute one at a time, under the library's lock): a graph's own was
# ~1 MiB for a Q4_K_M product on 2 threads, ~100 MiB for a 48-layer model's decode graphs
_work_buffer = torch.empty(0, dtype=torch.uint8)


def _work(size: int) -> int:
    """The address of the shared work buffer, grown to `size` bytes (and 64 to spare) if smaller. Call under the
    library's lock."""
    global _work_buffer
    if _work_buffer.numel() < size + 64:
        _work_buffer = torch.empty(size + 64, dtype=torch.uint8)
    return _work_buffer.data_ptr()


_graphs: OrderedDict[tuple, _Graph] = OrderedDict()
_graph_bytes = 0  # the buffers of the cached graphs
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


def torch_threads() -> None:
    """The calling thread's torch ops get back the cores a block product gave ggml's pool (_threads), for work
    that is torch's (a float32 checkpoint's prefill through its layers); the next block product takes them again."""
    choice = getattr(_cores, "choice", None)
    if choice is not None and torch.get_num_threads() != choice.cores:
        torch.set_num_threads(choice.cores)


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


def clear_graphs() -> None:
    """Drop every cached graph: the next calls build theirs again (with the thread count chosen then)."""
    global _graph_bytes
    _graphs.clear()
    _graph_bytes = 0


def limit_cached_graph_bytes(n: int) -> None:
    """Keep the cached graphs' buffers to n bytes from now on (the bound only goes down; the newest graph is
    kept whatever its size): a process under a memory limit planned them as a prefill chunk's activations."""
    global _CACHED_GRAPH_BYTES, _graph_bytes
    _CACHED_GRAPH_BYTES = min(_CACHED_GRAPH_BYTES, n)
    while len(_graphs) > 1 and _graph_bytes > _CACHED_GRAPH_BYTES:
        _graph_bytes -= _graphs.popitem(last=False)[1].nbytes


def sleep_between_calls() -> None:
    """Let ggml's threads sleep between products from now on (a process that reads experts from disk)."""
    global _poll
    _poll = 0


def cached_graph(key: tuple, build, work_bytes: int, tokens: int, check, nodes: int = 0) -> _Graph:
    """The cached graph of `key`, run on ggml's threads, or on the calling thread alone for a product that
    reads less than SMALL_WORK bytes of weights (waking a pool costs more than it saves there). `check()`
    validates the arguments when the graph is built: a key holds every pointer, shape and stride it checked,
    so a cached graph's arguments passed it already (a decode step pays no checks). The thread count is
    chosen by the speed of one-token products (a sequence's decode step: like for like from window to window)."""
    threads = _threads() if work_bytes >= SMALL_WORK else 1
    global _graph_bytes
    graph = _graphs.get(key)
    if graph is None:
        check()
        measured = work_bytes if work_bytes >= SMALL_WORK and tokens == 1 else 0
        graph = _graphs[key] = _Graph(build, measured, nodes)
        _graph_bytes += graph.nbytes
        while len(_graphs) > 1 and (len(_graphs) > _CACHED_GRAPHS or _graph_bytes > _CACHED_GRAPH_BYTES):
            _graph_bytes -= _graphs.popitem(last=False)[1].nbytes
    else:
        _graphs.move_to_end(key)
    graph.run_on(threads)
    return graph


def weight_tensor(base, ctx, qtype: int, w: torch.Tensor, layout: int = 0) -> int:
    """A ggml tensor over w uint8 [S, R, row bytes] (any stride between slots), ne = [C, R, S], whose bytes
    are in `layout` (kernels/ggml_repack.py; 0: the file's plain rows)."""
    s, r, rb = w.shape
    qk, bb = GGML_QUANT_SIZES[Q(qtype)]
    t = base.ggml_new_tensor_3d(ctx, qtype, rb // bb * qk, r, s)
    set_strides(t, rb, w.stride(0), w.stride(0) * s)
    set_data(t, w.data_ptr())
    if layout:
        mark(t, layout)
    return t


def _check_type(qtype: int, allowed: frozenset[int] = MUL_MAT_TYPES) -> None:
    if qtype not in allowed:
        name = Q(qtype).name if qtype in Q._value2member_map_ else qtype
        names = ", ".join(Q(t).name for t in sorted(allowed))
        raise ValueError(f"GGUF quantization type {name} has no moepager kernel (supported: {names})")


def _check(qtype: int, w: torch.Tensor, inputs: list[int], allowed: frozenset[int] = MUL_MAT_TYPES) -> None:
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


def activations(x: torch.Tensor) -> torch.Tensor:
    """x as float32 rows, contiguous (a no-op for the float32 activations of a decode step)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x = x.float().contiguous()
    return x.detach()


def mul_mat_id(
    qtype: int, bank: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, layout: int = 0
) -> torch.Tensor:
    """bank uint8 [S, R, row bytes] in `layout`, x float32 [N, C] or [N, K, C], ids [N, K] -> float32 [N, K, R]:
    out[n, k] = bank[ids[n, k]] @ x[n] (or x[n, k]), as llama.cpp computes it."""
    n, k = ids.shape
    s, r, _ = bank.shape
    x = activations(x)
    used = 1 if x.dim() == 2 else k  # inputs per token: shared by its K experts, or one each
    c = x.shape[-1]

    def check():
        _check(qtype, bank, list(x.shape))
        if x.shape[:-1] not in ((n,), (n, k)):
            raise ValueError(f"inputs {list(x.shape)}: not [N, C] or [N, K, C] for ids {list(ids.shape)}")

    def build(base, ctx):
        a = weight_tensor(base, ctx, qtype, bank, layout)
        b = base.ggml_new_tensor_3d(ctx, F32, c, used, n)
        i = base.ggml_new_tensor_2d(ctx, I32, k, n)
        return (b, i), base.ggml_mul_mat_id(ctx, a, b, i)

    key = ("id", qtype, layout, bank.data_ptr(), bank.dtype, bank.shape, bank.stride(), x.shape, k)
    graph = cached_graph(key, build, min(n * k, s) * r * bank.shape[-1], n, check)
    return graph(torch.empty(n, k, r, dtype=torch.float32), x, _slots(ids, s))


def swiglu_experts_nodes(
    base, ctx, types, banks, layouts, b: int, i: int, n: int, k: int, w: int | None = None
):
    """swiglu_experts' nodes over inputs b [D, 1, N] and slots i (int32 [K, N]), with weights w [1, K, N] (or
    None) -> (the output node, without a buffer of its own, and the intermediate nodes' buffers)."""
    gate, _, down = banks
    i_ff, d = gate.shape[1], down.shape[1]
    a_gate, a_up, a_down = (weight_tensor(base, ctx, *a) for a in zip(types, banks, layouts))
    g, u = base.ggml_mul_mat_id(ctx, a_gate, b, i), base.ggml_mul_mat_id(ctx, a_up, b, i)  # [I, K, N]
    h = base.ggml_swiglu_split(ctx, g, u)
    out = base.ggml_mul_mat_id(ctx, a_down, h, i)  # [D, K, N]
    scratch = [torch.empty(n, k, i_ff, dtype=torch.float32) for _ in range(3)]  # g, u, h
    for node, buf in zip((g, u, h), scratch):
        set_data(node, buf.data_ptr())
    if w is None:
        return out, scratch
    weighted = base.ggml_mul(ctx, out, w)
    scratch += [torch.empty(n, k, d, dtype=torch.float32) for _ in range(2)]  # out, weighted
    set_data(out, scratch[3].data_ptr())
    set_data(weighted, scratch[4].data_ptr())  # before the views, which take their data from it
    slot = [base.ggml_view_2d(ctx, weighted, d, n, d * k * 4, j * d * 4) for j in range(k)]  # [D, N] each
    if k == 1:
        return base.ggml_cont(ctx, slot[0]), scratch
    total = slot[0]  # summed into slot 0's rows in place, the last sum into the output
    for j in range(1, k - 1):
        total = base.ggml_add_inplace(ctx, total, slot[j])
    return base.ggml_add(ctx, total, slot[k - 1]), scratch


def swiglu_experts(
    types: tuple[int, int, int],
    banks: tuple,
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor | None = None,
    layouts: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """A SwiGLU MoE layer's routed experts in one graph, as llama.cpp's build_moe_ffn computes them: gate and
    up banks [S, I, row bytes], down [S, D, row bytes] of `types` in `layouts`, x float32 [N, D], ids [N, K] ->
    [N, K, D] = down(silu(gate x) * up x) per (token, slot) pair; with `weights` [N, K], their weighted sum
    [N, D], each pair's output times its weight, then added slot by slot as llama.cpp adds them. One call wakes
    the pool once for the layer."""
    gate, up, down = banks
    n, k = ids.shape
    s, i_ff, d = gate.shape[0], gate.shape[1], down.shape[1]
    x = activations(x)

    def check():
        for qtype, bank, inputs in zip(types, banks, (list(x.shape), list(x.shape), [i_ff])):
            _check(qtype, bank, inputs)
        if up.shape[:2] != gate.shape[:2] or down.shape[0] != s or x.shape[0] != n:
            raise ValueError(f"gate {list(gate.shape)}, up {list(up.shape)}, down {list(down.shape)} and inputs "
                             f"{list(x.shape)} are not one SwiGLU bank for ids {list(ids.shape)}")  # fmt: skip
        if weights is not None and weights.shape != ids.shape:
            raise ValueError(f"weights {list(weights.shape)} are not one per id {list(ids.shape)}")

    def build(base, ctx):
        b = base.ggml_new_tensor_3d(ctx, F32, x.shape[1], 1, n)
        i = base.ggml_new_tensor_2d(ctx, I32, k, n)
        if weights is None:
            out, scratch = swiglu_experts_nodes(base, ctx, types, banks, layouts, b, i, n, k)
            return (b, i), out, scratch
        w = base.ggml_new_tensor_3d(ctx, F32, 1, k, n)
        out, scratch = swiglu_experts_nodes(base, ctx, types, banks, layouts, b, i, n, k, w)
        return (b, i, w), out, scratch

    key = (
        "glu",
        types,
        layouts,
        *((t.data_ptr(), t.dtype, t.shape, t.stride()) for t in banks),
        x.shape,
        k,
        weights is None,
    )
    work = min(n * k, s) * (gate.shape[1] * gate.shape[2] * 2 + down.shape[1] * down.shape[2])
    graph = cached_graph(key, build, work, n, check, nodes=2 * k + 12)
    slots = _slots(ids, s)
    if weights is None:
        return graph(torch.empty(n, k, d, dtype=torch.float32), x, slots)
    return graph(torch.empty(n, d, dtype=torch.float32), x, slots, activations(weights))


def swiglu_mlp_nodes(base, ctx, types, mats, layouts, b: int, n: int):
    """swiglu_mlp's nodes over inputs b [D, N] -> (the output node, without a buffer, the intermediate buffers)."""
    a_gate, a_up, a_down = (
        weight_tensor(base, ctx, q, w[None], lay) for q, w, lay in zip(types, mats, layouts)
    )
    g, u = base.ggml_mul_mat(ctx, a_gate, b), base.ggml_mul_mat(ctx, a_up, b)  # [I, N]
    h = base.ggml_swiglu_split(ctx, g, u)
    scratch = [torch.empty(n, mats[0].shape[0], dtype=torch.float32) for _ in range(3)]
    for node, buf in zip((g, u, h), scratch):
        set_data(node, buf.data_ptr())
    return base.ggml_mul_mat(ctx, a_down, h), scratch


def swiglu_mlp(
    types: tuple[int, int, int], mats: tuple, x: torch.Tensor, layouts: tuple[int, int, int] = (0, 0, 0)
) -> torch.Tensor:
    """A dense SwiGLU feed-forward (a dense layer, a shared expert) in one graph, as llama.cpp's build_ffn
    computes it: gate and up uint8 [I, row bytes], down [D, row bytes] of `types` in `layouts`, x float32 [N, D] ->
    down(silu(gate x) * up x) [N, D]."""
    gate, up, down = mats
    n, i_ff, d = x.shape[0], gate.shape[0], down.shape[0]
    x = activations(x)

    def check():
        for qtype, w, inputs in zip(types, mats, (list(x.shape), list(x.shape), [i_ff])):
            _check(qtype, w, inputs)
        if up.shape[0] != i_ff or x.dim() != 2:
            raise ValueError(
                f"gate {list(gate.shape)}, up {list(up.shape)}, inputs {list(x.shape)}: not a SwiGLU"
            )

    def build(base, ctx):
        b = base.ggml_new_tensor_2d(ctx, F32, x.shape[1], n)
        return (b,), *swiglu_mlp_nodes(base, ctx, types, mats, layouts, b, n)

    key = ("mlp", types, layouts, *((w.data_ptr(), w.dtype, w.shape, w.stride()) for w in mats), x.shape)
    work = sum(w.numel() * w.element_size() for w in mats)
    return cached_graph(key, build, work, n, check)(torch.empty(n, d, dtype=torch.float32), x)


def mul_mat(qtype: int, w: torch.Tensor, x: torch.Tensor, layout: int = 0) -> torch.Tensor:
    """w uint8 [R, row bytes] in `layout`, x float32 [N, C] -> float32 [N, R] = x @ w.T, as llama.cpp computes it. Batched:
    w [H, R, row bytes] and x [H, N, C] -> [H, N, R], matrix h on inputs h (MLA's per-head k_b and v_b).
    Besides the block types, w may be F16 (rows llama.cpp's quantizer could not cut into blocks), whose
    products round x to fp16 as ggml's do, or F32."""
    x = activations(x)
    batched = w.dim() == 3

    def check():
        _check(qtype, w, list(x.shape))
        if x.dim() != w.dim() or (batched and x.shape[0] != w.shape[0]):
            raise ValueError(f"inputs {list(x.shape)} for weights {list(w.shape)}: not [N, C] or [H, N, C]")

    def build(base, ctx):
        a = weight_tensor(base, ctx, qtype, w if batched else w[None], layout)
        if batched:
            b = base.ggml_new_tensor_3d(ctx, F32, x.shape[2], x.shape[1], x.shape[0])
        else:
            b = base.ggml_new_tensor_2d(ctx, F32, x.shape[1], x.shape[0])
        return (b,), base.ggml_mul_mat(ctx, a, b)

    key = ("mm", qtype, layout, w.data_ptr(), w.dtype, w.shape, w.stride(), x.shape)
    graph = cached_graph(key, build, w.numel() * w.element_size(), x.shape[-2], check)
    return graph(torch.empty(*x.shape[:-1], w.shape[-2], dtype=torch.float32), x)


def dequantize(qtype: int, raw: torch.Tensor) -> torch.Tensor:
    """raw uint8 [..., R, row bytes] -> float32 [..., R, C], by ggml's own to_float."""
    _check_type(qtype)
    qk, bb = GGML_QUANT_SIZES[Q(qtype)]
    if raw.dtype != torch.uint8 or raw.shape[-1] % bb:
        raise ValueError(f"{Q(qtype).name} rows must be uint8 [..., k * {bb} bytes], not {list(raw.shape)}")
    raw = raw.contiguous()
    if qtype == Q.F32:  # already floats (ggml has no to_float for them)
        return raw.view(torch.float32).clone()
    out = torch.empty(*raw.shape[:-1], raw.shape[-1] // bb * qk, dtype=torch.float32)
    if out.numel():
        library().base.ggml_get_type_traits(qtype).contents.to_float(
            raw.data_ptr(), out.data_ptr(), out.numel()
        )
    return out
