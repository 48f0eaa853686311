"""`moepager tune`: fine-tune chosen routed experts (and, optionally, their router rows) of a store on text,
everything else frozen, and save the result as generations of the store.

Memory: the frozen experts stay on disk and run through the paged engine's expert cache under its byte budget;
only the trained experts (fp32 parameters) and their optimizer state are resident beside the dense model.

Gradients: the loss reaches a trained expert of layer L through every later layer, frozen experts included.
A frozen layer's experts run forward through the cache without autograd (their kernels have no backward);
their backward (`_FrozenExperts`) takes each expert from the cache again and recomputes it with torch ops
(moe.expert_forward) to pass the gradient on to x and to the routing weights. Trained experts run through
expert_forward with autograd on their own tokens. Only the trained tensors receive gradients.

Letters: N tokens, K active experts per token, D hidden.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MoepagerError
from ..model.moe import expert_forward, group_by_expert, route

Key = tuple[int, int]


@dataclass
class TuneOptions:
    text: Path  # training text
    store: Path  # the store tuned (its generations receive the checkpoints)
    experts: list[Key] | None = None  # explicit (layer, expert) pairs
    auto: int | None = None  # or: the N experts the text routes to most
    layers: list[int] | None = None  # restrict the choice (auto or explicit) to these layers
    router: bool = False  # also train the chosen experts' router rows
    steps: int = 100
    seq_len: int = 256
    lr: float = 1e-3
    expert_memory: str = "25%"
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    seed: int = 0
    progress: bool = True


class _FrozenExperts(torch.autograd.Function):
    """y = frozen_experts(layer, x, ids, weights), its backward recomputed expert by expert from the cache."""

    @staticmethod
    def forward(ctx, x, weights, ids, layer, base, config):
        ctx.save_for_backward(x, weights, ids)
        ctx.layer, ctx.base, ctx.config = layer, base, config
        return base(layer, x, ids, weights)

    @staticmethod
    def backward(ctx, gy):
        x, weights, ids = ctx.saved_tensors
        cache, layer = ctx.base.cache, ctx.layer
        gx, gw = torch.zeros_like(x), torch.zeros_like(weights)
        flat_w, flat_gw = weights.flatten(), gw.view(-1)
        for e, rows, pos in group_by_expert(ids):
            slot = cache.acquire(layer, [e])[e]
            try:
                w = cache.banks[layer].slots[slot]
                with torch.enable_grad():
                    xe = x[rows].detach().requires_grad_()
                    out = expert_forward(w, xe, ctx.config)  # [n, D]
                    g = gy[rows]
                    (gxe,) = torch.autograd.grad(out, xe, g * flat_w[pos, None].to(g.dtype))
            finally:
                cache.release_held(layer, [e])
            gx.index_add_(0, rows, gxe)
            flat_gw[pos] = (g * out.detach()).sum(-1).to(gw.dtype)
        return gx, gw, None, None, None, None


class TrainingExperts:
    """The experts contract for training: trained experts as parameters, the rest through the paged engine."""

    def __init__(self, base, config, trained: dict[Key, nn.ParameterDict]):
        self.base, self.config, self.trained = base, config, trained
        self.by_layer: dict[int, list[int]] = {}
        for layer, e in sorted(trained):
            self.by_layer.setdefault(layer, []).append(e)

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        mine = self.by_layer.get(layer, [])
        if not mine:
            return _FrozenExperts.apply(x, weights, ids, layer, self.base, self.config)
        is_trained = torch.isin(ids, torch.tensor(mine))  # [N, K]
        # trained pairs go to the frozen path as weight 0 on an expert the token already uses (or, when all of
        # its experts are trained, the first frozen one), so the cache never reads a trained expert
        frozen = [e for e in range(self.config.num_experts) if e not in mine]
        substitute = torch.where(is_trained, ids.new_tensor(frozen[0]), ids)
        first_frozen = torch.where(is_trained, ids.new_tensor(ids.shape[1]), torch.arange(ids.shape[1]))
        pick = first_frozen.min(dim=1, keepdim=True).values.clamp(max=ids.shape[1] - 1)  # [N, 1]
        fill = torch.where(is_trained.all(dim=1, keepdim=True), substitute[:, :1], ids.gather(1, pick))
        ids_f = torch.where(is_trained, fill, ids)
        y = _FrozenExperts.apply(x, weights.masked_fill(is_trained, 0), ids_f, layer, self.base, self.config)
        for e in mine:
            rows, k = (ids == e).nonzero(as_tuple=True)
            if rows.numel():
                out = expert_forward(dict(self.trained[(layer, e)]), x[rows], self.config)  # [n, D]
                y = y.index_add(0, rows, out * weights[rows, k][:, None].to(out.dtype))
        return y


class RowsRouter(nn.Module):
    """A router whose chosen rows (and router bias entries) are parameters; the other rows stay frozen."""

    def __init__(self, router, rows: list[int]):
        super().__init__()
        self.router, self.rows = router, torch.tensor(rows)
        self.weight = nn.Parameter(router.weight[self.rows].detach().float().clone())
        self.bias = (
            nn.Parameter(router.bias[self.rows].detach().float().clone()) if router.bias is not None else None
        )

    def forward(self, x: torch.Tensor):
        r = self.router
        if r.config.grouped_routing:  # the reference routes DeepSeek in fp32
            x, w = x.float(), r.weight.float()
            logits, mine = F.linear(x, w), F.linear(x, self.weight)
        else:
            logits = F.linear(x, r.weight, r.bias)
            mine = F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        logits = logits.index_copy(1, self.rows, mine)  # [N, E]
        return route(logits, r.config, r.e_score_correction_bias, r.absent)


class _Counter:
    """Experts contract wrapper that counts the tokens routed to each (layer, expert)."""

    def __init__(self, base):
        self.base, self.counts = base, {}

    def __call__(self, layer, x, ids, weights):
        for e, n in enumerate(torch.bincount(ids.flatten()).tolist()):
            if n:
                self.counts[(layer, e)] = self.counts.get((layer, e), 0) + n
        return self.base(layer, x, ids, weights)


def most_routed(engine, windows: torch.Tensor, n: int, layers: list[int] | None) -> list[Key]:
    """The n (layer, expert) pairs the text routes the most tokens to (ties: lower layer, lower id)."""
    counter = _Counter(engine.experts)
    engine.model.set_experts(counter)
    try:
        with torch.inference_mode():
            for ids in windows:
                engine.model(ids[None])
    finally:
        engine.model.set_experts(engine.experts)
    ranked = sorted(counter.counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [k for k, _ in ranked if layers is None or k[0] in layers][:n]


def _windows(engine, text: str, seq_len: int) -> torch.Tensor:
    if engine.tokenizer is None:
        raise MoepagerError(f"{engine.path} has no tokenizer.json; tuning needs one to read text")
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    n = len(ids) // seq_len
    if n == 0:
        raise MoepagerError(
            f"the text has {len(ids)} tokens, fewer than one window of {seq_len}; lower --seq-len"
        )
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


class ExpertTrainer:
    """Makes the chosen experts (and with `router`, their router rows) of an engine trainable: swaps training
    modules into the model until close(). The engine must page its experts (load(..., expert_memory=...))."""

    def __init__(self, engine, chosen: list[Key], router: bool = False):
        self.engine, self.chosen = engine, chosen
        net, base = engine.model, engine.experts
        if not hasattr(base, "cache"):
            raise MoepagerError(
                "tuning streams the frozen experts through the expert cache: load with expert_memory"
            )
        net.requires_grad_(False)
        self.trained: dict[Key, nn.ParameterDict] = {}
        for layer, e in chosen:
            w = base.cache.source.read_expert(layer, e)
            if any(not t.is_floating_point() for t in w.values()):
                raise MoepagerError(f"{engine.path}: its experts are quantized; tuning needs a float store")
            self.trained[(layer, e)] = nn.ParameterDict(
                {k: nn.Parameter(t.float().clone()) for k, t in w.items()}
            )
        self.routers: dict[int, RowsRouter] = {}
        if router:
            for layer in sorted({layer for layer, _ in chosen}):
                rows = [e for lay, e in chosen if lay == layer]
                self.routers[layer] = RowsRouter(net.layers[layer].ffn.router, rows)
        self._originals = {layer: net.layers[layer].ffn.router for layer in self.routers}
        for layer, r in self.routers.items():
            net.layers[layer].ffn.router = r
        net.set_experts(TrainingExperts(base, engine.config, self.trained))

    @property
    def params(self) -> list[nn.Parameter]:
        out = [p for d in self.trained.values() for p in d.values()]
        return out + [p for r in self.routers.values() for p in (r.weight, r.bias) if p is not None]

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of ids [B, T]."""
        logits = self.engine.model(ids)[:, :-1]  # [B, T-1, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    def save(self, st, message: str) -> int:
        """Stage the trained tensors in an EditableStore and commit them as a generation."""
        for (layer, e), p in self.trained.items():
            st.replace(layer, e, {k: v.detach() for k, v in p.items()})
        for layer, r in self.routers.items():
            for i, e in enumerate(r.rows.tolist()):
                st.set_router_row(
                    layer, e, r.weight[i].detach(), None if r.bias is None else r.bias[i].item()
                )
        return st.commit(message)

    def close(self) -> None:
        net = self.engine.model
        for layer, r in self._originals.items():
            net.layers[layer].ffn.router = r
        net.set_experts(self.engine.experts)


def tune(options: TuneOptions) -> dict:
    """Train, commit checkpoints as generations; return a summary (experts, losses, generations, memory)."""
    from ..runtime.engine import load
    from ..store.editable import EditableStore
    from ..store.format import is_store
    from ..system.progress import progress_bar

    o = options
    if not is_store(Path(o.store)):
        raise MoepagerError(f"{o.store} is not a moepager store; convert the model first (moepager convert)")
    text = Path(o.text)
    if not text.is_file():
        raise MoepagerError(f"no such text file: {text}")
    torch.manual_seed(o.seed)
    engine = load(o.store, dtype=torch.float32, expert_memory=o.expert_memory, prefetch=False)
    windows = _windows(engine, text.read_text(errors="replace"), o.seq_len)
    chosen = _choose(engine, windows, o)
    trainer = ExpertTrainer(engine, chosen, o.router)
    opt = torch.optim.AdamW(trainer.params, lr=o.lr, weight_decay=0.0)
    order = list(range(len(windows)))
    random.Random(o.seed).shuffle(order)
    losses, generations = [], []
    try:
        with EditableStore(o.store) as st:
            bar = progress_bar(range(o.steps), desc="tune", unit="step", enabled=o.progress)
            for step in bar:
                loss = trainer.loss(windows[order[step % len(order)]][None])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
                recent = losses[-10:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
                if step + 1 == o.steps or (o.save_every and (step + 1) % o.save_every == 0):
                    message = f"tune step {step + 1}: loss {sum(recent) / len(recent):.4f} on {text.name}"
                    generations.append(trainer.save(st, message))
    finally:
        trainer.close()
    state = [s for group in opt.state.values() for s in group.values() if torch.is_tensor(s)]
    return {
        "experts": chosen,
        "losses": losses,
        "generations": generations,
        "trained_bytes": sum(p.numel() * p.element_size() for p in trainer.params),
        "optimizer_bytes": sum(s.numel() * s.element_size() for s in state),
        "cache": engine.experts.stats(),
    }


def summary(r: dict, store: str | Path) -> str:
    """tune()'s result as two lines: what was trained and how the loss moved, then memory."""
    from ..system.sizes import format_bytes

    losses, c = r["losses"], r["cache"]
    first, last = (sum(losses[i : i + 10]) / len(losses[i : i + 10]) for i in (0, max(0, len(losses) - 10)))
    experts = ", ".join(f"{a}:{b}" for a, b in r["experts"])
    return (f"{store}: tuned {len(r['experts'])} experts ({experts}) for {len(losses)} steps, loss "
            f"{first:.4f}->{last:.4f}; generations {', '.join(map(str, r['generations']))}\n"
            f"memory: trained tensors {format_bytes(r['trained_bytes'])} + optimizer state "
            f"{format_bytes(r['optimizer_bytes'])}; expert cache peak {format_bytes(c['peak_resident_bytes'])} of "
            f"a {format_bytes(c['budget_bytes'])} budget ({format_bytes(c['total_expert_bytes'])} of experts)")  # fmt: skip


def _choose(engine, windows: torch.Tensor, o: TuneOptions) -> list[Key]:
    config = engine.config
    if (o.experts is None) == (o.auto is None):
        raise MoepagerError("choose the experts to train: --experts LAYER:EXPERT,... or --auto N")
    if o.auto is not None:
        if o.auto < 1:
            raise MoepagerError(f"--auto {o.auto}: give a number of experts of at least 1")
        return sorted(most_routed(engine, windows[: max(1, 4096 // windows.shape[1])], o.auto, o.layers))
    chosen = [k for k in o.experts if o.layers is None or k[0] in o.layers]
    for layer, e in chosen:
        if not (0 <= layer < config.num_layers and config.moe_layers[layer] and 0 <= e < config.num_experts):
            raise MoepagerError(f"--experts: {layer}:{e} is not a routed expert of this model")
        if e in config.absent_experts.get(layer, ()):
            raise MoepagerError(f"--experts: {layer}:{e} is removed or disabled in this store")
    if not chosen:
        raise MoepagerError("--experts and --layers leave no expert to train")
    return sorted(set(chosen))
