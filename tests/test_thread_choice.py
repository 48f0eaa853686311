"""ggml's thread count chosen by measured speed (kernels/thread_choice.py): the choice itself on given timings,
and a model whose products switch counts computing exactly what it computes on a fixed count."""

import threading
from pathlib import Path

import torch

import moepager
from moepager.kernels import ggml
from moepager.kernels.thread_choice import ThreadChoice

QWEN3_Q4_0 = Path(__file__).parent / "fixtures" / "gguf" / "qwen3_moe.q4_0.gguf"


def feed(choice: ThreadChoice, speed: dict[int, float], windows: int) -> list[int]:
    """Run `windows` windows of products at `speed[threads]` bytes/s -> the count each window ran at."""
    used = []
    for _ in range(windows):
        used.append(choice.current)
        start = choice.windows
        while choice.windows == start:
            choice.record(choice.current, 1_000_000, 1_000_000 / speed[choice.current])
    return used


def test_all_cores_on_a_quiet_machine_one_thread_on_a_busy_one():
    choice = ThreadChoice(2, window_s=0.01, probes=(40, 8))
    used = feed(choice, {2: 15e9, 1: 8e9}, 100)  # quiet: two threads nearly twice as fast
    assert used[:3] == [2, 1, 2] and used.count(1) == 1 + 2  # the first probe, then one every 40 windows
    used = feed(choice, {2: 1e9, 1: 7e9}, 100)  # other work arrives: every barrier waits for a time slice
    assert used[-90:].count(1) >= 90 - 90 // 8 - 1  # one thread, with a window at two every 8
    used = feed(choice, {2: 15e9, 1: 8e9}, 20)  # quiet again: back within one probe
    assert used[-10:] == [2] * 10


def test_a_probe_is_a_short_window():
    """A decode step as one graph is one product a token: probing one thread for a whole window cost a quiet
    machine ~12 small-model tokens at half speed."""
    choice, records = ThreadChoice(2, window_s=0.01), []
    for _ in range(3):
        start, n = choice.windows, 0
        while choice.windows == start:
            choice.record(choice.current, 1_000_000, 0.001)
            n += 1
        records.append(n)
    assert records == [10, 3, 10]  # a window at two threads, the first probe at one, two threads again


def test_products_of_one_thread_only_or_a_single_core_choose_nothing():
    choice = ThreadChoice(1, window_s=0.0)
    choice.record(1, 10, 1.0)
    assert choice.current == 1 and choice.windows == 0
    choice = ThreadChoice(2, window_s=0.0)
    choice.record(1, 10, 1.0)  # computed at a count that is not the current one
    assert choice.windows == 0


def test_switching_counts_changes_no_result_and_builds_no_graph_again(monkeypatch):
    engine = moepager.load(str(QWEN3_Q4_0))
    prompt = list(range(10, 30))
    built, init = [], ggml._Graph.__init__
    monkeypatch.setattr(ggml._Graph, "__init__", lambda self, *a, **k: built.append(1) or init(self, *a, **k))

    def run():
        ggml.clear_graphs()
        built.clear()
        out = engine.generate(prompt, max_new_tokens=12, temperature=1.0, seed=5)
        with torch.inference_mode():
            logits = engine.model(torch.tensor([prompt]))
        return out, logits, len(built)

    def counts():
        return {threads for graph in ggml._graphs.values() for threads, _ in graph.plans}

    monkeypatch.setattr(ggml, "SMALL_WORK", 0)  # the fixture's tiny products count as large ones
    monkeypatch.setattr(ggml, "_cores", threading.local())
    ggml._cores.choice = ThreadChoice(2, window_s=float("inf"))  # two threads throughout
    fixed = run()
    assert counts() == {2}
    ggml._cores.choice = ThreadChoice(2, window_s=0.0, probes=(1, 1))  # a window per product, each a probe
    switching = run()
    assert counts() == {1, 2}  # both counts computed
    assert fixed[0] == switching[0] and torch.equal(fixed[1], switching[1])
    assert switching[2] == fixed[2]  # a graph computed at both counts was built once
