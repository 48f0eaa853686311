"""Routing traces: which experts each token chose in each MoE layer, recorded during a run, replayed offline.

Owns the trace file format, the recorder (a wrapper of any Experts implementation, so a trace can be taken
with or without paging), and the replay that measures each eviction policy's hit rate at a budget against
Belady's optimal (MIN) bound. The replay drives the same Residency bookkeeping as the live cache, one layer
step at a time, and counts an expert once per layer step, as the cache reads it once per step. Belady's bound
obeys the same rules (a step's experts are held together), so it is what the best possible policy would reach.
"""

from __future__ import annotations

import heapq
import importlib.util
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoepagerError
from ..model.config import ModelConfig
from ..system.sizes import parse_bytes
from .policies import POLICIES, Policy
from .residency import Residency

TRACE_FORMAT = "moepager-trace"


@dataclass
class Trace:
    num_layers: int
    num_experts: int
    top_k: int
    steps: list[tuple[int, list[list[int]]]] = field(default_factory=list)  # (layer, ids per token [N][K])
    model: str = ""

    def save(self, path: str | Path) -> None:
        record = {"format": TRACE_FORMAT, "version": 1, "model": self.model, "num_layers": self.num_layers,
                  "num_experts": self.num_experts, "top_k": self.top_k,
                  "steps": [[layer, ids] for layer, ids in self.steps]}  # fmt: skip
        Path(path).write_text(json.dumps(record, separators=(",", ":")) + "\n")

    def requests(self) -> list[tuple[int, list[int]]]:
        """(layer, distinct experts ascending) per layer step: what the cache is asked for."""
        return [(layer, sorted({e for token in ids for e in token})) for layer, ids in self.steps]

    def num_keys(self) -> int:
        """Routed experts in the model (only MoE layers that appear in the trace count)."""
        return len({layer for layer, _ in self.steps}) * self.num_experts

    def per_token(self) -> Trace:
        """The same routing one token at a time, as decode would ask for it: a forward of N tokens (a prefill
        or an evaluation window: one step per layer) becomes N passes through its layers."""
        out = Trace(self.num_layers, self.num_experts, self.top_k, model=self.model)
        forward: list[tuple[int, list[list[int]]]] = []
        for layer, ids in [*self.steps, (None, [])]:  # a layer seen again (or the end) closes a forward
            if layer is None or any(layer == seen for seen, _ in forward):
                for t in range(min((len(ids_) for _, ids_ in forward), default=0)):
                    out.steps.extend((seen, [ids_[t]]) for seen, ids_ in forward)
                forward = []
            forward.append((layer, ids))
        return out

    def top(self, k: int) -> Trace:
        """Each token keeps only its first k experts (the router's best k, as recorded in rank order): a trace
        of the same text for a model routed top-k."""
        if not 1 <= k <= self.top_k:
            raise MoepagerError(f"top({k}): choose 1 to the trace's top_k ({self.top_k})")
        steps = [(layer, [token[:k] for token in ids]) for layer, ids in self.steps]
        return Trace(self.num_layers, self.num_experts, k, steps, self.model)


def load_trace(path: str | Path) -> Trace:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise MoepagerError(
            f"trace file {path} does not exist; record one with moepager run ... --trace FILE"
        ) from None
    except json.JSONDecodeError as e:
        raise MoepagerError(f"{path}: not a trace file (invalid JSON: {e})") from None
    if not isinstance(record, dict) or record.get("format") != TRACE_FORMAT:
        raise MoepagerError(f'{path}: not a routing trace (no "format": "{TRACE_FORMAT}")')
    if record.get("version") != 1:
        raise MoepagerError(f"{path}: trace version {record.get('version')!r} is not supported (expected 1)")
    steps = [(int(layer), ids) for layer, ids in record["steps"]]
    return Trace(record["num_layers"], record["num_experts"], record["top_k"], steps, record.get("model", ""))


class TraceRecorder:
    """Wraps an Experts implementation and records each layer step's routing before computing it."""

    def __init__(self, inner, config: ModelConfig):
        self.inner = inner
        self.trace = Trace(config.num_layers, config.num_experts, config.top_k, model=config.family)

    def __call__(self, layer, x, ids, weights):
        self.trace.steps.append((layer, ids.tolist()))
        return self.inner(layer, x, ids, weights)


# ------------------------------------------------------------------------------------------ replay


def replay(requests: list[tuple[int, list[int]]], capacity: int, policy: Policy) -> float:
    """Hit rate of `policy` with `capacity` slots over layer-step requests, waves included."""
    hits = total = 0
    for h, n in replay_steps(requests, capacity, policy):
        hits, total = hits + h, total + n
    return hits / total if total else 0.0


def replay_steps(
    requests: list[tuple[int, list[int]]], capacity: int, policy: Policy
) -> Iterator[tuple[int, int]]:
    """(hits, experts asked for) of each layer-step request in turn, as the live cache would count them."""
    res = Residency(capacity, policy)
    for layer, experts in requests:
        pending, hits, total = experts, 0, 0
        while pending:
            held = [e for e in pending if (layer, e) in res.slot]
            hits += len(held)
            for e in held:
                res.hold((layer, e))
            for e in pending:
                if (layer, e) in res.slot:
                    continue
                if res.claim((layer, e)) is None:
                    break
                res.hold((layer, e))
                held.append(e)
            for e in sorted(held):
                res.used((layer, e))
                res.drop((layer, e))
            total += len(held)
            pending = [e for e in pending if e not in held]
        yield hits, total


def belady(requests: list[tuple[int, list[int]]], capacity: int) -> float:
    """Belady's MIN under the replay's rules: no policy can hit more often. A step's experts are held
    together, so a miss evicts the resident key of another step used furthest in the future (MIN on the
    flattened key sequence would also evict a key of the step itself to load another, counting hits that no
    cache holding a step together gets). A step that needs more than fits runs in waves in the replay; there
    the bound counts every expert resident at the step's start as a hit and keeps, of all it had and read,
    the `capacity` keys used soonest: more than any order of waves can do."""
    nxt: list[list[float]] = [[] for _ in requests]  # per step, per expert: the step of its next use
    last: dict = {}
    for i in range(len(requests) - 1, -1, -1):
        layer, experts = requests[i]
        nxt[i] = [last.get((layer, e), math.inf) for e in experts]
        for e in experts:
            last[(layer, e)] = i
    resident: dict = {}  # key -> step of its next use
    heap: list = []  # (-next use, key); stale entries skipped
    hits = total = 0
    for i, (layer, experts) in enumerate(requests):
        keys = [(layer, e) for e in experts]
        hits += sum(k in resident for k in keys)
        total += len(keys)
        if len(keys) > capacity:
            pool = {**resident, **dict(zip(keys, nxt[i]))}
            resident = dict(heapq.nsmallest(capacity, pool.items(), key=lambda kv: (kv[1], kv[0])))
            heap = [(-n, k) for k, n in resident.items()]
            heapq.heapify(heap)
            continue
        step = set(keys)
        for key, n in zip(keys, nxt[i]):
            if key not in resident and len(resident) >= capacity:
                held = []
                while True:  # the furthest-used resident key that this step does not use
                    neg, victim = heapq.heappop(heap)
                    if resident.get(victim) != -neg:
                        continue
                    if victim not in step:
                        del resident[victim]
                        break
                    held.append((neg, victim))
                for entry in held:
                    heapq.heappush(heap, entry)
            resident[key] = n
            heapq.heappush(heap, (-n, key))
    return hits / total if total else 0.0


def capacity_for(budget: str | int, trace: Trace) -> int:
    """Slots for a budget given as a percentage of the trace's experts or a count of experts."""
    if isinstance(budget, str) and budget.strip().endswith("%"):
        n = parse_bytes(budget, trace.num_keys(), what="--budget")
    else:
        try:
            n = int(budget)
        except ValueError:
            raise MoepagerError(
                f"--budget {budget!r}: give a percentage of all experts (25%) or a count of experts"
            ) from None
    return max(n, trace.top_k)


def compare(
    trace: Trace, capacity: int, policies: dict[str, Callable[[], Policy]] | None = None
) -> dict[str, float]:
    """Hit rate of every policy and of Belady's bound at one capacity."""
    requests = trace.requests()
    out = {name: replay(requests, capacity, make()) for name, make in (policies or POLICIES).items()}
    out["belady"] = belady(requests, capacity)
    return out


def zipf_trace(num_layers: int = 16, num_experts: int = 64, top_k: int = 4, tokens: int = 400, s: float = 1.1,
               stickiness: float = 0.3, drift_every: int = 100, seed: int = 0) -> Trace:  # fmt: skip
    """A synthetic decode trace with real-ish locality: per layer, expert popularity is Zipf(s) over a random
    permutation that partly reshuffles every `drift_every` tokens (topic drift), and each pick repeats one of
    the previous token's experts with probability `stickiness` (consecutive tokens route alike)."""
    rng = random.Random(seed)
    ranks = [1.0 / (r + 1) ** s for r in range(num_experts)]
    perms = [rng.sample(range(num_experts), num_experts) for _ in range(num_layers)]
    prev = [[] for _ in range(num_layers)]
    trace = Trace(num_layers, num_experts, top_k, model="synthetic-zipf")
    for t in range(tokens):
        if t and t % drift_every == 0:
            for p in perms:  # swap a quarter of the ranks
                for _ in range(num_experts // 8):
                    i, j = rng.randrange(num_experts), rng.randrange(num_experts)
                    p[i], p[j] = p[j], p[i]
        for layer in range(num_layers):
            chosen: list[int] = []
            while len(chosen) < top_k:
                if prev[layer] and rng.random() < stickiness:
                    e = rng.choice(prev[layer])
                else:
                    e = perms[layer][rng.choices(range(num_experts), ranks)[0]]
                if e not in chosen:
                    chosen.append(e)
            prev[layer] = chosen
            trace.steps.append((layer, [chosen]))
    return trace


def check_plot(path: str | Path) -> None:
    """What plot() needs, checked before the replay is computed: matplotlib, and a folder to write into."""
    from ..system.output_paths import check_output_file

    if importlib.util.find_spec("matplotlib") is None:
        raise MoepagerError(f"--plot {path}: plotting needs matplotlib: pip install 'moepager[bench]'")
    check_output_file(path, "--plot")


def plot(trace: Trace, path: str | Path, fractions=(0.05, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75)) -> None:
    """Hit rate vs budget per policy, as a PNG (needs the optional matplotlib extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MoepagerError("plotting needs matplotlib: pip install 'moepager[bench]'") from None
    caps = [max(trace.top_k, int(f * trace.num_keys())) for f in fractions]
    rows = [compare(trace, c) for c in caps]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in rows[0]:
        ax.plot([100 * f for f in fractions], [r[name] for r in rows], marker="o", label=name,
                linestyle="--" if name == "belady" else "-")  # fmt: skip
    ax.set_xlabel("expert budget (% of all experts)")
    ax.set_ylabel("hit rate")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
