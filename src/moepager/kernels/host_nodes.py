"""The host's nodes in a paged decode step graph (kernels/ggml_step.py decode_step_paged): where ggml calls back
into Python at a MoE layer's router, so that the expert cache holds the layer's experts (reading those missing)
and says in which slots they are, and how such a call is kept cheap or skipped (kernels/host_entry.py)."""

from __future__ import annotations

import ctypes
import threading

import torch

from .ggml_library import I32, HostFn, set_data
from .host_entry import enter_on_missing, first_thread_only

_kept: set[int] = set()  # ggml's threads that keep a Python thread state


def _keep_thread_state() -> None:
    """Keep this thread's Python thread state from one host node to the next. Where a host node has no native
    entry (kernels/host_entry.py), ggml's other threads come back into Python at every host node, only to return;
    a thread Python did not start gets a new thread state for each such call and loses it after, which cost 18-42
    us a node on 2 threads (1.6 us kept): ~0.3 ms of a 3 ms token on the small Q4_0 file. One more
    PyGILState_Ensure that is never released keeps it."""
    thread = threading.get_ident()
    if thread not in _kept:
        _kept.add(thread)
        ctypes.pythonapi.PyGILState_Ensure()


class Holds:
    """The host's part of a paged step graph: a node at each MoE layer (ggml_map_custom2 over its slots and the
    guess) where ggml's first thread may call back into Python while the others wait at the barrier after it.

    With a slot table (the cache's `step_table`: each expert's slot, -1 where not held) the graph looks the
    router's ids up itself (ggml_get_rows) and the node's native entry (host_entry.enter_on_missing) enters Python
    only where an expert was not found: a decoded token that hits everywhere runs no Python inside its graph. The
    found layers' bookkeeping (hits, the policy's order) is done at the next node that enters, before it may
    evict, and after the graph (`found`). Where Python is entered the host holds the layer's experts in the cache
    (reading those missing), writes their slots for the products that follow, and lets go of the previous
    entered layer's experts, whose products are done by then (every node of this layer comes after them). Made
    once per graph; hold, release and found are set per call."""

    def __init__(self):
        self.call = HostFn(self._node)  # kept alive as long as the graph whose entries jump to it
        self.fn = first_thread_only(self.call)  # only ggml's first thread enters Python where it can
        self.entries: list = []  # each table-looking node's own entry (its slots' address in its code)
        self.order: list[int] = []  # the MoE layers in graph order
        self.next = 0  # order[next:] are not yet entered nor found in this call
        self.ids: dict[int, ctypes.Array] = {}  # layer -> its router's top K (a view of the argsort's buffer)
        self.guess: dict[int, ctypes.Array] = {}  # layer -> the next router's top K on its experts' input
        self.slots: dict[int, ctypes.Array] = {}  # layer -> where the host put its experts (its output)
        self.hold = self.release = self.found = self.held = self.error = None

    def node(self, base, ctx, own, layer: int, ids: int, ids_buffer: torch.Tensor, k: int,
             guess: tuple[int, torch.Tensor, int] | None, table: torch.Tensor | None) -> int:  # fmt: skip
        """The host node of `layer`: its router's ids (int32 [K, 1], whose values are ids_buffer's first K) ->
        the slots [K, 1]. guess: (the argsort node, its buffer, the next layer's K) or None. table: the slot of
        each of the layer's experts (int32 [E], -1 where not held), or None: the node always enters Python."""
        address = lambda t, n: (ctypes.c_int32 * n).from_address(t.data_ptr())  # noqa: E731
        self.order.append(layer)
        self.ids[layer] = address(ids_buffer, k)
        after = ids  # the node's second source: the guess where there is one, so that it is computed before
        if guess is not None:
            after, buffer, k_next = guess
            self.guess[layer] = address(buffer, k_next)
        buffer = torch.zeros(k, dtype=torch.int32)  # slot 0 until written: a valid index
        own.scratch.append(buffer)
        source, fn = ids, self.fn
        if table is not None:
            # the slots looked up in the graph, into the buffer the node writes where it enters
            rows = base.ggml_new_tensor_2d(ctx, I32, 1, table.numel())
            set_data(rows, table.data_ptr())
            looked = base.ggml_get_rows(ctx, rows, ids)  # [1, K, 1]
            set_data(looked, buffer.data_ptr())  # before the view, which takes its data from it
            source = base.ggml_reshape_2d(ctx, looked, k, 1)
            fn = enter_on_missing(self.call, buffer.data_ptr(), k)
            self.entries.append(fn)
        slots = base.ggml_map_custom2(ctx, source, after, fn, 1, layer)
        set_data(slots, buffer.data_ptr())
        self.slots[layer] = address(buffer, k)
        return slots

    def _node(self, dst, a, b, ith, nth, layer) -> None:
        if ith:  # ggml calls every thread's part: the others return
            _keep_thread_state()
            return
        layer = layer or 0  # a null userdata is layer 0
        slots = self.slots[layer]
        if self.error is not None:
            slots[:] = [0] * len(slots)  # a valid index for the products, whose result is dropped
            return
        try:
            self._found_until(layer)
            done, self.held = self.held, None  # the previous entered layer's, let go of by hold first
            ids = list(self.ids[layer])
            guess = self.guess.get(layer)
            slots[:] = self.hold(layer, ids, None if guess is None else list(guess), done)
            self.held = (layer, ids)
        except BaseException as e:  # raised once the graph returns (its result is dropped)
            slots[:] = [0] * len(slots)
            self.error = e

    def _found_until(self, stop: int | None) -> None:
        """The layers before `stop` (every one left where None) since the last entered node: their experts were
        all found in the table, their node returned without Python."""
        order, i = self.order, self.next
        while i < len(order) and order[i] != stop:
            self.found(order[i], list(self.ids[order[i]]))
            i += 1
        self.next = i + 1

    def end(self) -> None:
        """After the graph: the found layers after the last entered one counted, its experts let go of; an error
        of a host node raised."""
        held, error, release = self.held, self.error, self.release
        try:
            if error is None:
                self._found_until(None)
        finally:
            self.hold = self.release = self.found = self.held = self.error = None
            self.next = 0
            if held is not None:
                release(*held)
        if error is not None:
            raise error
