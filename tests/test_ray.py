"""Experts spread over Ray actors on a local cluster: the same tokens and logits as one process, resident and
paged, placed by usage with hot experts replicated, in continuous batching too; nodes joining and leaving are
reported; a lost actor fails its request clearly and the next request succeeds."""

import os
import signal
import time
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB

import moepager
from moepager.errors import MoepagerError
from moepager.generation.batching import Scheduler, Sequence
from moepager.generation.generate import SamplingParams

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a cluster and its actor processes take seconds to start

FAMILY = "qwen3_moe"  # 16 experts, top-4: a token's experts land on both actors


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module (a head node: its own GCS and raylet processes; nodes can be added),
    stopped when it ends. Ray binds it to this machine's address: it maps 127.0.0.1 to that itself."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def model(tiny):
    path, ref = tiny(FAMILY)
    prompt = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens = ref.generate(prompt[None], max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, 7:]
    return path, prompt, tokens.tolist()


def _load(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a budget below top_k is raised to it, with a warning
        return moepager.load(path, **kw)


@pytest.fixture(scope="module")
def two_actors(model, cluster):
    """The model's experts resident on two actors, shared by the tests that leave them alive."""
    engine = _load(model[0], ray=cluster.address, ray_actors=2)
    yield engine
    engine.experts.close()


@pytest.mark.parametrize("budget", [None, 1], ids=["resident", "paged"])
def test_two_actors_match_one_process(model, cluster, two_actors, budget):
    """budget 1 is raised to top_k slots per process: both page, in waves. One process sums each wave apart
    (its rounding may differ from resident); actors return pairs, so they match resident bit for bit."""
    path, prompt, reference = model
    resident, local = _load(path), _load(path, expert_memory=budget)
    dist = (
        two_actors if budget is None else _load(path, expert_memory=budget, ray=cluster.address, ray_actors=2)
    )
    try:
        ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
        assert torch.equal(dist.logits(ids), resident.logits(ids))  # prefill: grouped pairs
        torch.testing.assert_close(dist.logits(ids), local.logits(ids), rtol=0, atol=1e-5)
        assert dist.generate(prompt, 16) == local.generate(prompt, 16) == reference
        stats = dist.stats()["experts"]
        assert (
            stats["distributed"]["calls"] <= 2 * stats["distributed"]["layer_steps"]
        )  # one per actor and step
        assert [a["paged"] for a in stats["actors"]] == [budget is not None] * 2
        assert len({a["pid"] for a in stats["actors"]} | {os.getpid()}) == 3  # separate processes
    finally:
        if dist is not two_actors:
            dist.experts.close()


@pytest.mark.parametrize("kind", ["f32", "q4_0"])
def test_a_gguf_on_two_actors_is_one_process(cluster, kind):
    """A GGUF's experts on actors are computed as in one process, by ggml on the file's own rows (float32 or
    blocks): the same logits bit for bit, prefill and decoded tokens."""
    path = Path(__file__).parent / "fixtures" / "gguf" / f"qwen3_moe.{kind}.gguf"
    local, dist = _load(path), _load(path, ray=cluster.address, ray_actors=2)
    try:
        ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(4))
        assert torch.equal(dist.logits(ids), local.logits(ids))
        assert dist.generate(ids[0], 12, stop_ids=[]) == local.generate(ids[0], 12, stop_ids=[])
        assert dist.stats()["experts"]["distributed"]["calls"] > 0
    finally:
        dist.experts.close()


def test_cli_runs_on_the_cluster(model, cluster, capsys):
    import json

    from moepager.cli import main

    path, prompt, reference = model
    ids = ",".join(map(str, prompt.tolist()))
    argv = ["run", str(path), "--prompt-ids", ids, "--max-tokens", "16", "--json", "--ray", cluster.address]
    assert main([*argv, "--ray-actors", "2"]) == 0
    out = capsys.readouterr()
    record = json.loads(out.out)
    assert record["token_ids"] == reference
    assert len(record["stats"]["experts"]["actors"]) == 2
    assert "experts on 2 Ray actors" in out.err  # the summary line names the distribution's cost


def test_continuous_batching_matches_single_sequences(model, two_actors):
    prompts = [model[1].tolist(), [5, 9, 2, 11]]
    alone = [two_actors.generate(p, 8) for p in prompts]
    events = {0: [], 1: []}
    scheduler = Scheduler(two_actors)
    scheduler.start()
    for i, p in enumerate(prompts):
        scheduler.submit(Sequence(p, 8, SamplingParams(0.0, 1.0, 0, None, []), events[i].append))
    for _ in range(1200):
        if all(e and e[-1][0] != "token" for e in events.values()):
            break
        time.sleep(0.05)
    scheduler.stop()
    assert [[v for kind, v in events[i] if kind == "token"] for i in (0, 1)] == alone
    assert scheduler.stats.step_sequences > scheduler.stats.steps  # the sequences shared decode steps


def _wait_for(events, event):
    for _ in range(100):
        if any(e["event"] == event for e in events):
            return True
        time.sleep(0.1)
    return False


def test_nodes_joining_and_leaving_are_reported(cluster, two_actors, caplog):
    events = two_actors.experts.nodes.events
    node = cluster.add_node(num_cpus=0)  # no CPUs: no actor restarts onto it
    try:
        assert _wait_for(events, "joined")
    finally:
        cluster.remove_node(node)
    assert _wait_for(events, "left")
    assert "left the cluster" in caplog.text
    assert two_actors.stats()["experts"]["node_events"][-1]["event"] == "left"


def test_lost_actor_fails_the_request_clearly_then_recovers(model, cluster, tmp_path):
    """Placed by measured usage, the two hottest experts of each layer on both actors."""
    path, prompt, reference = model
    traced = _load(path, record_trace=True)
    traced.generate(prompt, 16)
    traced.trace.save(tmp_path / "trace.json")
    dist = _load(
        path, ray=cluster.address, ray_actors=2, ray_placement=str(tmp_path / "trace.json"), ray_replicate=2
    )
    try:
        assert sum(len(o) == 2 for o in dist.experts.plan.values()) == 2 * len(dist.experts.home)
        before = dist.experts.actor_pids()
        out = []
        with pytest.raises(MoepagerError, match="expert actor 0 .* was lost .* retry the request"):
            for token in dist.stream(prompt, 16):
                out.append(token)
                if len(out) == 3:
                    os.kill(before[0], signal.SIGKILL)
        assert out == reference[: len(out)] and len(out) < 16
        assert dist.generate(prompt, 16) == reference  # restarted, its experts reloaded
        after = dist.experts.actor_pids()
        assert after[0] != before[0] and after[1] == before[1]
        assert dist.stats()["experts"]["distributed"]["failures"] == 1
    finally:
        dist.experts.close()
