"""The libggml moepager computes GGUF blocks with, loaded once through ctypes: llama-cpp-python's own when it is
installed (the very library a GGUF's reference, llama.cpp, computes with, built for this machine), else the
libggml-python wheel's (built for AVX2); MOEPAGER_LIBGGML names another, or "wheel". Owns the library's
functions as moepager calls them, the structs they take, its thread pools, and writing a tensor's data
pointer and strides (ggml tensors here are views of torch memory). kernels/ggml.py builds graphs on it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading

from gguf import GGMLQuantizationType

from ..errors import MoepagerError

Q = GGMLQuantizationType
F32, I32 = 0, 26  # ggml_type values of the activations and the ids

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_MAX_THREADS = 512  # GGML_MAX_N_THREADS, the size of the thread pool's cpu mask
# struct ggml_tensor (ggml.h, ggml 0.20): type, buffer, ne[4], nb[4], op, op_params[16], flags, src[10],
# view_src, view_offs, data, name[64], then extra. Checked against ggml_get_data when the library loads.
BUFFER_OFFSET = 8
_NE_OFFSET = 16
_NB_OFFSET = 48
DATA_OFFSET = 248
EXTRA_OFFSET = 320


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", _P), ("no_alloc", ctypes.c_bool)]


class CPlan(ctypes.Structure):
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


# a host node's function (ggml_custom2_op_t): dst, a, b, ith, nth, userdata
HostFn = ctypes.CFUNCTYPE(None, _P, _P, _P, ctypes.c_int, ctypes.c_int, _P)
_LogCallback = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, _P)
_WARN, _CONT = 3, 5  # ggml_log_level: its debug and info lines (one per repacked matrix) are not printed
_last_level = [0]  # what a continued line continues


@_LogCallback
def _log(level: int, text: bytes, _user) -> None:
    if level != _CONT:
        _last_level[0] = level
    if _last_level[0] >= _WARN and text:
        sys.stderr.write(text.decode(errors="replace"))


def _signatures(base: ctypes.CDLL, cpu: ctypes.CDLL) -> None:
    for lib, name, res, args in [
        (base, "ggml_init", _P, [InitParams]),
        (base, "ggml_free", None, [_P]),
        (base, "ggml_new_tensor_3d", _P, [_P, ctypes.c_int, _I64, _I64, _I64]),
        (base, "ggml_new_tensor_2d", _P, [_P, ctypes.c_int, _I64, _I64]),
        (base, "ggml_mul_mat", _P, [_P, _P, _P]),
        (base, "ggml_mul_mat_id", _P, [_P, _P, _P, _P]),
        (base, "ggml_swiglu_split", _P, [_P, _P, _P]),
        (base, "ggml_rms_norm", _P, [_P, _P, ctypes.c_float]),
        (base, "ggml_mul", _P, [_P, _P, _P]),
        (base, "ggml_div", _P, [_P, _P, _P]),
        (base, "ggml_silu", _P, [_P, _P]),
        (base, "ggml_add", _P, [_P, _P, _P]),
        (base, "ggml_add_inplace", _P, [_P, _P, _P]),
        (base, "ggml_cont", _P, [_P, _P]),
        (base, "ggml_cpy", _P, [_P, _P, _P]),
        (base, "ggml_view_2d", _P, [_P, _P, _I64, _I64, ctypes.c_size_t, ctypes.c_size_t]),
        (base, "ggml_new_tensor_1d", _P, [_P, ctypes.c_int, _I64]),
        (base, "ggml_soft_max", _P, [_P, _P]),
        (base, "ggml_argsort", _P, [_P, _P, ctypes.c_int]),
        (base, "ggml_map_custom2", _P, [_P, _P, _P, HostFn, ctypes.c_int, _P]),
        (base, "ggml_get_rows", _P, [_P, _P, _P]),
        (base, "ggml_sum_rows", _P, [_P, _P]),
        (base, "ggml_clamp", _P, [_P, _P, ctypes.c_float, ctypes.c_float]),
        (base, "ggml_reshape_2d", _P, [_P, _P, _I64, _I64]),
        (base, "ggml_reshape_3d", _P, [_P, _P, _I64, _I64, _I64]),
        (base, "ggml_soft_max_ext", _P, [_P, _P, _P, ctypes.c_float, ctypes.c_float]),
        (base, "ggml_permute", _P, [_P, _P, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]),
        (base, "ggml_transpose", _P, [_P, _P]),
        # ctx, a, positions, freq factors; n_dims, mode, n_ctx_orig; freq base and scale, ext, attn, beta fast, slow
        (base, "ggml_rope_ext", _P, [_P] * 4 + [ctypes.c_int] * 3 + [ctypes.c_float] * 6),
        (base, "ggml_new_graph_custom", _P, [_P, ctypes.c_size_t, ctypes.c_bool]),
        (base, "ggml_build_forward_expand", None, [_P, _P]),
        (base, "ggml_get_data", _P, [_P]),
        (base, "ggml_set_name", _P, [_P, ctypes.c_char_p]),
        (base, "ggml_tensor_overhead", ctypes.c_size_t, []),
        (base, "ggml_graph_overhead_custom", ctypes.c_size_t, [ctypes.c_size_t, ctypes.c_bool]),
        (base, "ggml_get_type_traits", ctypes.POINTER(_ToFloat), [ctypes.c_int]),
        (base, "ggml_threadpool_params_default", _PoolParams, [ctypes.c_int]),
        (base, "ggml_log_set", None, [_LogCallback, _P]),
        (base, "ggml_backend_reg_get_proc_address", _P, [_P, ctypes.c_char_p]),
        (base, "ggml_backend_reg_dev_get", _P, [_P, ctypes.c_size_t]),
        (base, "ggml_backend_buft_name", ctypes.c_char_p, [_P]),
        (base, "ggml_backend_buft_alloc_buffer", _P, [_P, ctypes.c_size_t]),
        (base, "ggml_backend_buffer_init_tensor", ctypes.c_int, [_P, _P]),
        (base, "ggml_backend_tensor_set", None, [_P, _P, ctypes.c_size_t, ctypes.c_size_t]),
        (cpu, "ggml_cpu_init", None, []),
        (cpu, "ggml_cpu_has_avx2", ctypes.c_int, []),
        (cpu, "ggml_cpu_has_avx512", ctypes.c_int, []),
        (cpu, "ggml_graph_plan", CPlan, [_P, ctypes.c_int, _P]),
        (cpu, "ggml_graph_compute", ctypes.c_int, [_P, ctypes.POINTER(CPlan)]),
        (cpu, "ggml_threadpool_new", _P, [ctypes.POINTER(_PoolParams)]),
        (cpu, "ggml_backend_cpu_reg", _P, []),
    ]:
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


LIBRARY_ENV = "MOEPAGER_LIBGGML"


def _library_dir() -> tuple[str, str]:
    """(directory holding libggml-base.so and libggml-cpu.so, what it is). MOEPAGER_LIBGGML names one, or
    "wheel" for the libggml-python wheel's. Otherwise llama-cpp-python's own when it is installed: the very
    library a GGUF's reference (llama.cpp) computes with, built for this machine (the wheel's is built for AVX2,
    and its float sums run in other orders than an AVX-512 build's), then the wheel's."""
    import importlib.util

    chosen = os.environ.get(LIBRARY_ENV, "")
    if chosen and chosen != "wheel":
        if not _holds_libraries(chosen):
            raise MoepagerError(f"{LIBRARY_ENV}={chosen}: no {' and '.join(_LIBRARIES)} there; give their "
                                "directory, or 'wheel' for the libggml-python wheel's")  # fmt: skip
        return chosen, chosen
    spec = None if chosen else importlib.util.find_spec("llama_cpp")  # found, not imported
    if spec is not None and spec.origin:
        where = os.path.join(os.path.dirname(spec.origin), "lib")
        if _holds_libraries(where):
            return where, "llama-cpp-python"
    import libggml  # the prebuilt libraries ship in this wheel; imported only when a GGUF is computed

    return os.path.join(os.path.dirname(libggml.__file__), "lib64"), "libggml-python wheel"


_LIBRARIES = ("libggml-base.so", "libggml-cpu.so")


def _holds_libraries(where: str) -> bool:
    return all(os.path.exists(os.path.join(where, f)) for f in _LIBRARIES)


class Library:
    """The two libraries, loaded once, and one thread pool per thread count."""

    def __init__(self):
        where, self.origin = _library_dir()
        self.base = ctypes.CDLL(os.path.join(where, _LIBRARIES[0]), mode=ctypes.RTLD_GLOBAL)
        self.cpu = ctypes.CDLL(os.path.join(where, _LIBRARIES[1]), mode=ctypes.RTLD_GLOBAL)
        try:
            _signatures(self.base, self.cpu)
        except AttributeError as e:  # an older or newer ggml than moepager calls
            raise MoepagerError(f"libggml in {where} lacks a function moepager calls ({e}); set "
                                f"{LIBRARY_ENV}=wheel to use the libggml-python wheel's") from None  # fmt: skip
        self.base.ggml_log_set(_log, None)
        self.cpu.ggml_cpu_init()
        self.pools: dict[tuple[int, int], int] = {}
        # one graph computes at a time: graphs and pools are shared (reentrant: a step graph is reshaped, then
        # called, under one hold)
        self.lock = threading.RLock()
        self._check_layout()

    def describe(self) -> str:
        """e.g. "llama-cpp-python's libggml, AVX-512": which library computes GGUF blocks, for what CPU."""
        return f"{self.origin}'s libggml, {simd_form() or 'without AVX2'}"

    def _check_layout(self) -> None:
        ctx = self.base.ggml_init(InitParams(self.base.ggml_tensor_overhead() * 2, None, True))
        try:
            t = self.base.ggml_new_tensor_2d(ctx, F32, 32, 3)
            set_data(t, 0x1000)
            self.base.ggml_set_name(t, b"x")  # name[64] lies just before extra
            nb = (ctypes.c_size_t * 2).from_address(t + _NB_OFFSET)
            name = ctypes.c_char.from_address(t + DATA_OFFSET + 8).value
            if self.base.ggml_get_data(t) != 0x1000 or tuple(nb) != (4, 128) or name != b"x":
                raise MoepagerError(
                    f"{self.origin}'s struct ggml_tensor is not the layout moepager was written "
                    f"for; set {LIBRARY_ENV}=wheel to use the libggml-python wheel's"
                )
        finally:
            self.base.ggml_free(ctx)

    def pool(self, threads: int, poll: int) -> int:
        if (threads, poll) not in self.pools:
            params = self.base.ggml_threadpool_params_default(threads)
            params.poll = poll
            self.pools[threads, poll] = self.cpu.ggml_threadpool_new(ctypes.byref(params))
        return self.pools[threads, poll]


_lib: Library | None = None
_lib_lock = threading.Lock()


def loaded() -> bool:
    """Whether this process has loaded the library (a GGUF was computed on), without loading it."""
    return _lib is not None


def library() -> Library:
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = Library()
    return _lib


def set_data(tensor: int, ptr: int) -> None:
    ctypes.c_void_p.from_address(tensor + DATA_OFFSET).value = ptr


@functools.cache
def simd_form() -> str:
    """ "AVX-512" or "AVX2" (or ""): the form of ggml's float loops in the loaded library (its softmax's exp
    sums 16 or 8 values per vector)."""
    cpu = library().cpu
    return "AVX-512" if cpu.ggml_cpu_has_avx512() else "AVX2" if cpu.ggml_cpu_has_avx2() else ""


def set_extent(tensor: int, dim: int, n: int, contiguous: bool = False) -> None:
    """Set a float32 ggml tensor's ne[dim] to n, and for a `contiguous` one its byte strides nb[1..3] with it (a
    view's strides stay): a built graph's node given another extent, for the next plan and call."""
    ne = (_I64 * 4).from_address(tensor + _NE_OFFSET)
    ne[dim] = n
    if contiguous:
        nb = (ctypes.c_size_t * 4).from_address(tensor + _NB_OFFSET)
        nb[1:] = [4 * ne[0], 4 * ne[0] * ne[1], 4 * ne[0] * ne[1] * ne[2]]


def set_strides(tensor: int, *nb: int) -> None:
    """Set a ggml tensor's byte strides nb[1], nb[2], ... (nb[0] is its element size): a view of torch memory."""
    (ctypes.c_size_t * len(nb)).from_address(tensor + _NB_OFFSET + 8)[:] = nb
