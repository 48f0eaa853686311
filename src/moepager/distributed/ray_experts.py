"""RayExperts: the experts contract over Ray actors, each holding a shard of every MoE layer's experts.

The driver keeps the dense part (embeddings, attention, routers, shared experts). A layer step sorts its
(token, expert) pairs by expert, sends each actor that serves some of them ONE call with the tokens it needs,
the pairs and the step's mode (gathered for few tokens, grouped for many, as moe.switch_glu chooses), then
weighs and sums the returned pair outputs in switch_glu's order: the same result, bit for bit, as one process.
The calls to different actors are in flight together; a decode step costs at most one round trip per actor
per MoE layer, a batched step of continuous batching the same.

Faults: actors are restarted by Ray (their experts reloaded from their node's copy of the model); a request
whose call was lost fails with a MoepagerError naming the actor, the next one waits for the restart. Every
wait has a deadline. A thread watches the cluster and logs nodes joining or leaving.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import MoepagerError
from ..model.config import ModelConfig
from ..model.moe import few_tokens, group_by_expert, sum_in_order
from .placement import Plan, place, shards, usage_from_trace
from .shard import ExpertShard, from_wire, to_wire

log = logging.getLogger("moepager.ray")

STEP_TIMEOUT_S = 300.0  # one layer step, a restart after a lost actor included
READY_TIMEOUT_S = 1800.0  # actors placed and their experts loaded
MAX_RESTARTS = 3  # per actor; one that keeps dying (say its node lost the model files) is given up on
WATCH_S = 2.0  # how often the cluster's nodes are looked at


def _ray():
    try:
        import ray
    except ImportError:
        raise MoepagerError("--ray needs Ray: pip install 'moepager[ray]'") from None
    return ray


def connect(address: str) -> None:
    """Join the Ray cluster at address (as ray.init takes it: auto, 127.0.0.1:6379, local) unless this
    process is already connected to one."""
    ray = _ray()
    if ray.is_initialized():
        return
    _reachable(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise MoepagerError(
            f"cannot connect to a Ray cluster at {address!r} ({e}); start one with "
            "`ray start --head --port 6379` and give its address, or 'local' for a cluster of this machine"
        ) from None


def _reachable(address: str, timeout: float = 10.0) -> None:
    """A host:port address must answer: Ray itself would keep retrying it for minutes."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", "local": Ray finds (or starts) the cluster itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise MoepagerError(
            f"no Ray cluster answers at {address} ({e.strerror or e}); start one with `ray start --head "
            "--port 6379` on that machine, or give 'auto' to find the one this machine belongs to"
        ) from None


@dataclass
class WireStats:
    """Distribution costs, summed since the start (divide by tokens for per-token figures)."""

    layer_steps: int = 0  # MoE layer steps computed through actors
    calls: int = 0  # actor calls = round trips (those of one step are in flight together)
    bytes_sent: int = 0  # payload sent to actors: tokens' hidden states and pair indices
    bytes_received: int = 0  # payload received: pair outputs
    wait_s: float = 0.0  # time the driver waited for actors' answers
    actor_s: float = 0.0  # of which the slowest called actor of each step was computing
    driver_s: float = 0.0  # time the driver spent preparing calls and combining answers
    failures: int = 0  # steps failed by a lost or failing actor


class NodeWatch:
    """Logs nodes joining or leaving the cluster (a background thread polling ray.nodes())."""

    def __init__(self, ray):
        self.ray, self.events = ray, []
        self.alive = self._alive()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moepager-ray-nodes", daemon=True)
        self._thread.start()

    def _alive(self) -> dict[str, str]:
        return {n["NodeID"]: n["NodeManagerAddress"] for n in self.ray.nodes() if n["Alive"]}

    def _run(self) -> None:
        while not self._stop.wait(WATCH_S):
            try:
                now = self._alive()
            except Exception:  # the driver is disconnecting
                return
            for node, verb in [(n, "joined") for n in now.keys() - self.alive.keys()] + [
                (n, "left") for n in self.alive.keys() - now.keys()
            ]:
                address = now.get(node) or self.alive.get(node)
                self.events.append({"time": time.time(), "node": node, "address": address, "event": verb})
                log.warning(
                    "ray node %s (%s) %s the cluster; %d nodes alive", node[:12], address, verb, len(now)
                )
            self.alive = now

    def stop(self) -> None:
        self._stop.set()


class RayExperts:
    """x [N, D], ids [N, K], weights [N, K] -> y [N, D], computed by the actors that hold the experts."""

    def __init__(self, config: ModelConfig, actors: list, plan: Plan, timeout: float = STEP_TIMEOUT_S):
        self.ray = _ray()
        self.config, self.actors, self.plan, self.timeout = config, actors, plan, timeout
        layers = sorted({layer for layer, _ in plan})
        # layer -> each expert's home actor; layer -> {expert: every actor holding it} for replicated experts
        self.home = {layer: torch.zeros(config.num_experts, dtype=torch.long) for layer in layers}
        self.replicas: dict[int, dict[int, list[int]]] = {layer: {} for layer in layers}
        for (layer, e), owners in plan.items():
            self.home[layer][e] = owners[0]
            if len(owners) > 1:
                self.replicas[layer][e] = owners
        self.wire = WireStats()
        self.lost: set[int] = set()  # actors whose call was lost: the next step first waits for their restart
        self.nodes = NodeWatch(self.ray)
        weakref.finalize(self, self.nodes.stop)  # an engine dropped without close() stops watching too
        self.info = self._ready(READY_TIMEOUT_S)
        # GGUF experts: one process computes a layer in ggml's graph, for prefill too, and sums in its order
        self.fused = all(info["fused"] for info in self.info)

    def _ready(self, timeout: float) -> list[dict]:
        refs = [a.ready.remote() for a in self.actors]
        deadline = time.perf_counter() + timeout
        return [self._get(i, ref, deadline, "loading its experts") for i, ref in enumerate(refs)]

    def _get(self, i: int, ref, deadline: float, doing: str):
        """An actor's answer, or a MoepagerError saying which actor failed and what to do."""
        ray = self.ray
        try:
            return ray.get(ref, timeout=max(0.0, deadline - time.perf_counter()))
        except ray.exceptions.GetTimeoutError:
            self.wire.failures += 1
            raise MoepagerError(
                f"expert actor {i} did not answer in time while {doing} ({STEP_TIMEOUT_S:.0f} s for a layer step, "
                f"{READY_TIMEOUT_S:.0f} s for loading); check the cluster (`ray status`): a node may be gone or "
                "out of resources"
            ) from None
        except ray.exceptions.RayActorError as e:
            self.wire.failures += 1
            self.lost.add(i)
            raise MoepagerError(
                f"expert actor {i} ({self._describe(i)}) was lost while {doing} ({type(e).__name__}); "
                "Ray is restarting it and reloading its experts: retry the request"
            ) from None
        except ray.exceptions.RayTaskError as e:
            self.wire.failures += 1
            raise MoepagerError(f"expert actor {i} failed while {doing}: {e.cause!r}") from None

    def _await_restart(self, i: int, deadline: float) -> None:
        """Wait until lost actor i answers again (Ray restarts it, its experts reloaded), up to the deadline."""
        ray = self.ray
        while True:
            left = deadline - time.perf_counter()
            try:
                self.info[i] = ray.get(self.actors[i].ready.remote(), timeout=max(0.0, left))
                self.lost.discard(i)
                log.warning("expert actor %d is back (pid %d)", i, self.info[i]["pid"])
                return
            except ray.exceptions.GetTimeoutError:
                left = 0
            except ray.exceptions.RayActorError:  # not noticed dead yet, or restarting
                time.sleep(0.2)
            if left <= 0.2:
                raise MoepagerError(
                    f"expert actor {i} was lost and did not come back within {self.timeout:.0f} s (Ray restarts an "
                    f"actor {MAX_RESTARTS} times); check the cluster (`ray status`) and load the model again"
                )

    def _describe(self, i: int) -> str:
        info = self.info[i] if getattr(self, "info", None) else {}
        mine = sum(1 for owners in self.plan.values() if i in owners)
        return f"{mine} experts" + (f", on {info['host']} pid {info['pid']}" if info else "")

    def _owners(self, layer: int, experts: torch.Tensor) -> torch.Tensor:
        """The actor serving each pair (pairs sorted by expert): its expert's home, or for a replicated expert,
        among its holders the one this step calls anyway (no extra round trip), else the one with fewer pairs.
        All pairs of an expert go to one actor, so its tokens are computed together as in one process."""
        owner = self.home[layer][experts]  # [P]
        replicated = self.replicas[layer]
        if not replicated:
            return owner
        ids, counts = torch.unique_consecutive(experts, return_counts=True)
        load = [0] * len(self.actors)
        for e, c in zip(ids.tolist(), counts.tolist()):
            if e not in replicated:
                load[int(self.home[layer][e])] += c
        start = 0
        for e, c in zip(ids.tolist(), counts.tolist()):
            if e in replicated:
                best = min(replicated[e], key=lambda a: (load[a] == 0, load[a], a))
                owner[start : start + c] = best
                load[best] += c
            start += c
        return owner

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        t_start = time.perf_counter()
        n, k = ids.shape
        grouped = not few_tokens(ids, self.config) and not self.fused
        flat = ids.flatten().cpu()
        # pairs by expert, then token: each expert's tokens ascending, as one process takes them
        order = torch.argsort(flat, stable=True)
        experts = flat[order]
        owner = self._owners(layer, experts)
        xc = x.cpu()
        deadline = time.perf_counter() + self.timeout
        for i in sorted(self.lost):
            self._await_restart(i, deadline)
        calls = []
        for a in torch.unique(owner).tolist():
            sel = torch.nonzero(owner == a).flatten()
            pos = order[sel]  # the pairs' positions in ids.flatten()
            rows, local = torch.unique(pos // k, return_inverse=True)  # tokens this actor needs
            args = (to_wire(xc[rows]), local.numpy(), experts[sel].numpy())
            calls.append((a, pos, self.actors[a].compute.remote(layer, *args, grouped)))
            self.wire.bytes_sent += sum(v.nbytes for v in (args[0][1], args[1], args[2]))
        t0 = time.perf_counter()
        answers = [(pos, self._get(a, ref, deadline, f"computing layer {layer}")) for a, pos, ref in calls]
        t1 = time.perf_counter()
        self.wire.wait_s += t1 - t0
        self.wire.actor_s += max(seconds for _, (_, seconds) in answers)
        outs = [(pos, from_wire(out)) for pos, (out, _) in answers]
        self.wire.layer_steps += 1
        self.wire.calls += len(calls)
        self.wire.bytes_received += sum(o.numel() * o.element_size() for _, o in outs)
        full = outs[0][1].new_empty(n * k, outs[0][1].shape[1])  # [N*K, D]
        for pos, out in outs:
            full[pos] = out
        full = full.to(x.device)
        if self.fused:  # as moe.gathered over GGUF blocks
            y = sum_in_order(full.view(n, k, -1), weights)
        elif not grouped:  # as moe.gathered: sum_k weights * out
            y = torch.bmm(weights[:, None].to(full.dtype), full.view(n, k, -1))[:, 0]
        else:  # as moe.grouped: experts ascending
            y = torch.zeros_like(x)
            flat_w = weights.flatten()
            for _, token_rows, pos in group_by_expert(ids):
                y.index_add_(0, token_rows, full[pos] * flat_w[pos, None].to(full.dtype))
        self.wire.driver_s += time.perf_counter() - t_start - (t1 - t0)
        return y

    def stats(self) -> dict:
        """The wire costs, each actor's own stats (its cache's when paged) and the cluster's node events."""
        deadline = time.perf_counter() + self.timeout
        refs = [a.stats.remote() for a in self.actors]
        actors = []
        for i, ref in enumerate(refs):
            try:
                actors.append(self._get(i, ref, deadline, "reporting stats"))
            except MoepagerError as e:
                actors.append({"error": str(e)})
        out = {"distributed": asdict(self.wire), "actors": actors, "node_events": list(self.nodes.events)}
        out["distributed"]["nodes_alive"] = len(self.nodes.alive)
        out["bytes_read"] = sum(a.get("cache", {}).get("bytes_read", 0) for a in actors)
        return out

    def actor_pids(self) -> list[int]:
        """The actors' process ids now (a restarted actor has a new one)."""
        deadline = time.perf_counter() + self.timeout
        refs = [a.ready.remote() for a in self.actors]
        return [self._get(i, ref, deadline, "reporting its pid")["pid"] for i, ref in enumerate(refs)]

    def close(self) -> None:
        """Stop the actors and the node watch."""
        self.nodes.stop()
        for a in self.actors:
            self.ray.kill(a, no_restart=True)
        self.actors = []


def build_ray(source, address: str, actors: int | None = None, placement: str | None = None, replicate: int = 0,
              expert_memory=None, dtype: torch.dtype | None = None, experts_dtype: str | None = None,
              policy: str | None = None, actor_cpus: float = 1) -> RayExperts:  # fmt: skip
    """Connect to the cluster, place the experts of `source` (a ModelSource; actors open its path themselves)
    on `actors` actors (default: one per alive node), start them and wait until their experts are loaded.

    placement: None or "round-robin", or a routing trace file (balance by measured usage); replicate: the
    most used experts per layer given a second actor. expert_memory: each actor's own budget (a size, or a
    share of its experts); None holds them all. dtype, experts_dtype, policy: as moepager.load's."""
    ray = _ray()
    connect(address)
    config = source.config
    keys = source.expert_keys()
    if not keys:
        raise MoepagerError(f"{source.path}: this model has no routed experts to distribute")
    if actors is None:
        actors = max(1, sum(1 for n in ray.nodes() if n["Alive"]))
    if actors > config.num_experts:
        raise MoepagerError(f"ray_actors {actors} exceeds the {config.num_experts} experts of a layer")
    usage = None
    if placement not in (None, "round-robin"):
        usage = usage_from_trace(placement)
    plan = place(keys, actors, usage, replicate)
    shard = ray.remote(ExpertShard).options(
        max_restarts=MAX_RESTARTS, max_task_retries=0, num_cpus=actor_cpus, scheduling_strategy="SPREAD"
    )
    path = str(Path(source.path).resolve())  # actors do not share the driver's working directory
    handles = [shard.remote(path, mine, expert_memory, dtype, experts_dtype, policy)
               for mine in shards(plan, actors)]  # fmt: skip
    return RayExperts(config, handles, plan)
