"""Carve a dense llama-family model into a Qwen2-MoE checkpoint ("MoEfication") and write it.

Design (why Qwen2-MoE): its attention is exactly llama's (qkv_bias=false), and it has an always-on shared
expert, the natural home for the FFN neurons that fire on most tokens.

Per layer the I SwiGLU neurons are permuted (`order`) and cut into one shared expert of S neurons followed by
E routed experts of m = (I - S) / E neurons each. Because a SwiGLU FFN is a sum over its neurons, the dense
FFN equals shared + sum of all experts, each unweighted. The checkpoint keeps that equality exact:
  - shared expert: the gate's logit is kept below 2^-30 (SHARED_GATE_LOGIT), so sigmoid(logit) = 0.5 exactly in
    fp32; its down_proj is stored x2. The logit is tiny, not zero: llama.cpp computes this sigmoid as
    silu(z) / z, which is 0 / 0 = NaN at z = 0 (see shared_gate);
  - routed experts: each down_proj is stored xE; the router's logits are scaled down so that, for every
    token, they differ by at most 2^-16 (ROUTER_SPREAD). Softmax probabilities are then 1/E within a relative
    2^-16 (exactly 1/E for equal logits, E a power of two) yet still rank the experts, so top-K selects the
    K experts the router predicts matter, each weighted ~1, as in the dense sum (norm_topk_prob=false). An fp32
    softmax near 1/E resolves logit gaps of ~2^-23 only, so experts nearer than that rank by rounding, which
    two engines may do apart (benchmarks/quant_kernels.md, agreement on the default model).
So the K=E checkpoint reproduces the dense FFN up to that 2^-16 relative weight deviation (logits within
1e-4), and K<E drops the experts the router ranks lowest: the routing weights carry no learned scale.

Calibration (what is learned, small, and shippable as a "plan": `order` [L, I] and `router` [L, E, D]):
the dense model runs layer by layer over calibration text (residual stream [N, D] held once, dense upstream).
At each layer, with a = silu(x Wg^T) * (x Wu^T) and neuron contribution c_i = |a_i| * ||Wd[:, i]||:
  - the S neurons with the largest mean contribution form the shared expert;
  - the rest are clustered by co-activation (cosine of their contribution patterns over a token sample)
    with balanced spherical k-means into E equal experts (seeded init, greedy capacity-bounded assignment);
  - the router is a ridge regression from the FFN input x to log ||expert output||, centred per token: its
    ranking predicts which experts contribute most to that token.
Deterministic for a given seed on a given machine. Memory: the dense weights of one layer, the residual
stream and one layer's activations [N, I].
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MoepagerError

ROUTER_SPREAD = 2.0**-16  # max - min of a token's router logits on calibration text
SHARED_GATE_LOGIT = 2.0**-30  # bound on |shared gate logit|: sigmoid rounds to 0.5 in fp32 below ~2^-25
FAMILIES = ("llama", "mistral")
SHARD_BYTES = 2 << 30
PLAN_FILE = "moefy/plan.safetensors"  # in a subfolder, so checkpoint readers never take it for weights


@dataclass
class Plan:
    """What moefy learns. Letters: L layers, I dense intermediate, E experts, D hidden."""

    order: torch.Tensor  # [L, I] int64: neuron permutation; first `shared`, then E blocks of (I - shared) / E
    router: torch.Tensor  # [L, E, D] float32: router weights, already scaled to ROUTER_SPREAD
    shared: int  # S: neurons of the always-on shared expert
    meta: dict  # provenance: seed, calibration tokens, source

    @property
    def experts(self) -> int:
        return self.router.shape[1]

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        meta = {"shared": str(self.shared), "meta": json.dumps(self.meta, sort_keys=True)}
        save_file({"order": self.order.to(torch.int32), "router": self.router.contiguous()}, str(path), meta)

    @classmethod
    def load(cls, path: Path) -> Plan:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if "shared" not in meta:
                raise MoepagerError(f"{path}: not a moefy plan (no 'shared' in its metadata)")
            return cls(f.get_tensor("order").long(), f.get_tensor("router").float(), int(meta["shared"]),
                       json.loads(meta.get("meta", "{}")))  # fmt: skip


# ------------------------------------------------------------------------------------- dense input


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def dense_folder(dense: str | Path, workdir: Path) -> Path:
    """A dense HF llama folder: `dense` itself, or a GGUF file converted into `workdir`."""
    path = Path(dense).expanduser()
    if path.is_file():
        from .gguf_dense import convert_gguf

        return convert_gguf(path, workdir / "dense")
    from ..sources.checkpoint import read_config, resolve

    folder = resolve(path)
    config, _ = read_config(folder)
    if config.family not in FAMILIES:
        raise MoepagerError(
            f"{folder}: moefy needs a dense llama-family model; this one is {config.family!r}"
        )
    return folder


# ------------------------------------------------------------------------------------- clustering


def balanced_kmeans(feat: torch.Tensor, k: int, gen: torch.Generator, iters: int = 25) -> torch.Tensor:
    """feat [n, d] unit rows -> cluster id [n], every cluster exactly n / k members (spherical k-means)."""
    n = feat.shape[0]
    size = n // k
    centroids = feat[torch.randperm(n, generator=gen)[:k]].clone()  # [k, d]
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        sim = feat @ centroids.T  # [n, k]
        new = _capacity_assign(sim, size)
        if torch.equal(new, assign):
            break
        assign = new
        for c in range(k):
            centroids[c] = F.normalize(feat[assign == c].sum(0), dim=0)
    return assign


def _capacity_assign(sim: torch.Tensor, size: int) -> torch.Tensor:
    """Greedy: the most confident items first, each to its most similar cluster that still has room."""
    n, k = sim.shape
    best = sim.max(dim=1).values
    order = torch.argsort(best, descending=True, stable=True).tolist()
    s = sim.numpy()
    room = [size] * k
    full = torch.zeros(k, dtype=torch.bool).numpy()
    assign = [0] * n
    for i in order:
        row = s[i].copy()
        row[full] = -float("inf")
        c = int(row.argmax())
        assign[i] = c
        room[c] -= 1
        if room[c] == 0:
            full[c] = True
    return torch.tensor(assign, dtype=torch.long)


# ------------------------------------------------------------------------------------- calibration


def calibration_ids(tokenizer, text: str, tokens: int, seq_len: int) -> torch.Tensor:
    """Text -> [B, seq_len] token ids: consecutive windows, at most `tokens` ids in all."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    n = min(len(ids), tokens) // seq_len
    if n == 0:
        raise MoepagerError(f"calibration text is too short: {len(ids)} tokens, need at least {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


@torch.no_grad()
def fit_layer(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, experts: int,
              shared: int, gen: torch.Generator, sample: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One layer: FFN inputs x [N, D] and dense weights -> (order [I], router logits weight [E, D])."""
    a = F.silu(x @ gate.T) * (x @ up.T)  # [N, I]
    contrib = a.abs() * down.norm(dim=0)  # [N, I]
    top = torch.argsort(contrib.mean(0), descending=True, stable=True)
    shared_ids, rest = top[:shared], top[shared:].sort().values
    pick = torch.randperm(x.shape[0], generator=gen)[:sample]
    feat = F.normalize(contrib[pick][:, rest].T, dim=1)  # [I - S, n]
    cluster = balanced_kmeans(feat, experts, gen)
    groups = [rest[cluster == e] for e in range(experts)]
    order = torch.cat([shared_ids.sort().values, *groups])
    # each expert's output norm per token: what the router learns to rank
    a, down = a[:, order[shared:]], down[:, order[shared:]]  # experts now contiguous blocks of m
    m = a.shape[1] // experts
    norms = torch.stack([(a[:, j * m : (j + 1) * m] @ down[:, j * m : (j + 1) * m].T).norm(dim=1)
                         for j in range(experts)], dim=1)  # [N, E]  # fmt: skip
    target = norms.clamp_min(1e-12).log()
    target = target - target.mean(dim=1, keepdim=True)
    gram = x.T @ x  # [D, D]
    ridge = 1e-3 * gram.diagonal().mean()
    w = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0]), x.T @ target).T  # [E, D]
    logits = x @ w.T
    spread = (logits.max(dim=1).values - logits.min(dim=1).values).max()
    return order, w * (ROUTER_SPREAD / spread.clamp_min(1e-30))


@torch.no_grad()
def calibrate(folder: Path, text: str, experts: int, shared: int, seed: int, tokens: int = 8192,
              seq_len: int = 256, batch: int = 8) -> Plan:  # fmt: skip
    """Run the dense model over `text` layer by layer and learn the plan."""
    from ..runtime.engine import load
    from ..system.progress import progress_bar

    engine = load(folder, dtype=torch.float32)
    model, cfg = engine.model, engine.config
    if engine.tokenizer is None:
        raise MoepagerError(f"{folder}: no tokenizer.json, which calibration needs to read its text")
    inter = cfg.intermediate_size
    if not 0 < shared < inter or (inter - shared) % experts:
        raise MoepagerError(f"shared={shared} must leave the {inter} neurons divisible by experts={experts}")
    gen = torch.Generator().manual_seed(seed)
    ids = calibration_ids(engine.tokenizer, text, tokens, seq_len)
    rope = model.rotary(torch.arange(seq_len), torch.float32)
    xs = [
        model.embed(ids[i : i + batch]) for i in range(0, len(ids), batch)
    ]  # residual stream, [b, T, D] each
    orders, routers = [], []
    for block in progress_bar(model.layers, desc="moefy: calibrating layers", unit="layer"):
        hs = [x + block.attn(block.attn_norm(x), rope, None, 0) for x in xs]
        fs = [block.ffn_norm(h) for h in hs]
        mlp = block.ffn
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in fs])  # [N, D]
        order, router = fit_layer(flat, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, experts,
                                  shared, gen)  # fmt: skip
        orders.append(order)
        routers.append(router)
        xs = [h + mlp(f) for h, f in zip(hs, fs)]  # dense upstream for the next layer
    meta = {"seed": seed, "calibration_tokens": int(ids.numel()), "experts": experts, "shared": shared}
    return Plan(torch.stack(orders), torch.stack(routers), shared, meta)


# ------------------------------------------------------------------------------------- writing


def moe_config(dense: dict, plan: Plan, top_k: int) -> dict:
    """The Qwen2-MoE config.json for a dense llama config.json and a plan."""
    heads, hidden = dense["num_attention_heads"], dense["hidden_size"]
    if dense.get("head_dim", hidden // heads) != hidden // heads:
        raise MoepagerError("moefy: Qwen2-MoE needs head_dim == hidden_size / num_attention_heads")
    if dense.get("attention_bias") or dense.get("mlp_bias"):
        raise MoepagerError("moefy: dense models with attention or MLP biases are not supported")
    if (
        dense.get("rope_scaling")
        or (dense.get("rope_parameters") or {}).get("rope_type", "default") != "default"
    ):
        raise MoepagerError("moefy: only the default rope is supported for the Qwen2-MoE output")
    e = plan.experts
    if not 1 <= top_k <= e:
        raise MoepagerError(f"--top-k must be between 1 and --experts ({e}), got {top_k}")
    inter = dense["intermediate_size"]
    rope_theta = dense.get("rope_theta") or (dense.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "vocab_size": dense["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": inter,
        "moe_intermediate_size": (inter - plan.shared) // e,
        "shared_expert_intermediate_size": plan.shared,
        "num_experts": e,
        "num_experts_per_tok": top_k,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "num_hidden_layers": dense["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": dense.get("num_key_value_heads", heads),
        "qkv_bias": False,
        "hidden_act": "silu",
        "max_position_embeddings": dense.get("max_position_embeddings", 4096),
        "rms_norm_eps": dense.get("rms_norm_eps", 1e-6),
        "rope_theta": rope_theta,
        "tie_word_embeddings": dense.get("tie_word_embeddings", False),
        "use_sliding_window": False,
        "bos_token_id": dense.get("bos_token_id"),
        "eos_token_id": dense.get("eos_token_id"),
        "output_router_logits": False,
        "torch_dtype": "float32",
        "moefy": plan.meta,
    }


def shared_gate(ffn_norm: torch.Tensor) -> torch.Tensor:
    """The shared expert's gate weight [1, D] for a layer whose FFN input is RMSNorm(h) * ffn_norm [D].

    sigmoid(gate . x) must be 0.5 for every token, as for a zero gate, but the logit must not be 0: llama.cpp's
    qwen2moe graph computes the sigmoid as silu(z) / z, NaN at z = 0 (a zero gate gave NaN logits on every
    token). One coordinate j (the largest |ffn_norm|, so never a zero weight) times a power of two c: the logit
    c * x_j is exact, bounded by c * |ffn_norm_j| * sqrt(D) (an RMS-normed vector has norm sqrt(D)) <=
    SHARED_GATE_LOGIT, and 0 only when h_j is exactly 0."""
    j = int(ffn_norm.abs().argmax())
    bound = ffn_norm[j].abs().item() * ffn_norm.numel() ** 0.5
    if bound == 0:
        raise MoepagerError("moefy: a layer's post-attention norm weights are all zero")
    gate = torch.zeros(1, ffn_norm.numel())
    gate[0, j] = 2.0 ** math.floor(math.log2(SHARED_GATE_LOGIT / bound))
    return gate


class _ShardWriter:
    """Accumulate tensors and write safetensors shards of at most SHARD_BYTES, plus an index when sharded."""

    def __init__(self, out: Path):
        self.out, self.pending, self.nbytes, self.files, self.weight_map = out, {}, 0, [], {}

    def add(self, name: str, t: torch.Tensor) -> None:
        self.pending[name] = t.contiguous()
        self.nbytes += t.numel() * t.element_size()
        if self.nbytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"shard-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.out / name), {"format": "pt"})
        self.files.append((name, list(self.pending)))
        self.pending, self.nbytes = {}, 0

    def close(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.out / self.files[0][0], self.out / "model.safetensors")
            return
        for i, (name, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(self.out / name, self.out / final)
            self.weight_map.update({n: final for n in names})
        index = {"metadata": {}, "weight_map": self.weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                    "generation_config.json")  # fmt: skip


@torch.no_grad()
def assemble(folder: Path, plan: Plan, top_k: int, out: str | Path) -> Path:
    """Write the Qwen2-MoE checkpoint of dense `folder` cut by `plan` to `out` (temp name, then renamed)."""
    from ..system.progress import progress_bar
    from ..system.safetensors import read_index, read_tensor

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoepagerError(f"{out} already exists; remove it or choose another output path")
    dense = json.loads((folder / "config.json").read_text())
    config = moe_config(dense, plan, top_k)
    layers, e, s = dense["num_hidden_layers"], plan.experts, plan.shared
    if (
        plan.order.shape != (layers, dense["intermediate_size"])
        or plan.router.shape[2] != dense["hidden_size"]
    ):
        raise MoepagerError(f"the moefy plan (order {tuple(plan.order.shape)}, router {tuple(plan.router.shape)}) "
                            f"does not fit this model ({layers} layers, {dense['intermediate_size']} neurons)")  # fmt: skip
    index = read_index(folder)
    get = lambda name: read_tensor(index[name]).float()  # noqa: E731
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        writer = _ShardWriter(tmp)
        for name in index:
            if not name.startswith("model.layers."):
                writer.add(name, get(name))
        m = (dense["intermediate_size"] - s) // e
        for i in progress_bar(range(layers), desc="moefy: writing experts", unit="layer"):
            p = f"model.layers.{i}."
            for name in index:
                if name.startswith(p) and ".mlp." not in name:
                    writer.add(name, get(name))
            order = plan.order[i]
            gate, up = get(p + "mlp.gate_proj.weight")[order], get(p + "mlp.up_proj.weight")[order]  # [I, D]
            down = get(p + "mlp.down_proj.weight")[:, order]  # [D, I]
            writer.add(p + "mlp.shared_expert.gate_proj.weight", gate[:s])
            writer.add(p + "mlp.shared_expert.up_proj.weight", up[:s])
            writer.add(p + "mlp.shared_expert.down_proj.weight", down[:, :s] * 2)  # the gate is 0.5
            writer.add(
                p + "mlp.shared_expert_gate.weight", shared_gate(get(p + "post_attention_layernorm.weight"))
            )
            writer.add(p + "mlp.gate.weight", plan.router[i].float())
            for j in range(e):
                cols = slice(s + j * m, s + (j + 1) * m)
                writer.add(p + f"mlp.experts.{j}.gate_proj.weight", gate[cols])
                writer.add(p + f"mlp.experts.{j}.up_proj.weight", up[cols])
                writer.add(p + f"mlp.experts.{j}.down_proj.weight", down[:, cols] * e)  # softmax weight ~1/E
        writer.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name in _TOKENIZER_FILES:
            if (folder / name).exists():
                shutil.copy(folder / name, tmp / name)
        (tmp / PLAN_FILE).parent.mkdir()
        plan.save(tmp / PLAN_FILE)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished the same folder first
            raise MoepagerError(
                f"{out} appeared while it was being written; remove it or choose another path"
            ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def moefy(dense: str | Path, out: str | Path, experts: int, top_k: int, seed: int = 0, shared: int | None = None,
          calibration_text: str | None = None, tokens: int = 8192, plan: Plan | None = None) -> Path:  # fmt: skip
    """The whole job: dense checkpoint (folder or GGUF) -> Qwen2-MoE checkpoint folder at `out`."""
    if experts < 1:
        raise MoepagerError(f"--experts must be at least 1, got {experts}")
    with tempfile.TemporaryDirectory(prefix="moefy-") as work:
        folder = dense_folder(dense, Path(work))
        if plan is None:
            inter = json.loads((folder / "config.json").read_text())["intermediate_size"]
            if shared is None:  # about half the neurons; experts of a multiple of 4 neurons (16-byte rows)
                shared = inter - experts * ((inter - inter // 2) // experts // 4 * 4)
            if calibration_text is None:
                from ..data import calibration_text as default_text

                calibration_text = default_text()
            plan = calibrate(folder, calibration_text, experts, shared, seed, tokens)
            if Path(dense).is_file():  # lets a shipped plan check it is applied to the same file
                plan.meta["source_sha256"] = sha256_file(Path(dense))
        elif plan.experts != experts:
            raise MoepagerError(f"the plan has {plan.experts} experts but --experts is {experts}")
        return assemble(folder, plan, top_k, out)
