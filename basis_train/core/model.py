"""A GPT with exact or BASIS linear layers, in two architectures (`arch`).

- "paper": the paper's tiny GPT (docs/paper.md section 2): pre-LN blocks, learned absolute
  positions, separate q/k/v projections, tanh GELU, LayerNorm eps 1e-6, an untied bias-free
  head, no dropout, Flax-default initialisation (lecun normal, no residual scaling).
- "gpt2": GPT-2's architecture and initialisation as people train it (nanoGPT, HF GPT-2): one
  fused qkv projection, the token embedding tied to the head, N(0, 0.02) weights with the two
  residual output projections of each block at 0.02 / sqrt(2 n_layer), LayerNorm eps 1e-5,
  biases on every linear layer but the head. With a sketched head the BASIS dW estimate of the
  head and the embedding's exact row gradient add on the one tied weight.

Which linear layers are sketched is a constructor choice; the initial weights depend
only on the seed, never on that choice, so exact and BASIS runs can be paired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from basis_train.core.basis_linear import BasisLinear
from basis_train.core.head import FusedBasisHead, FusedHead
from basis_train.core.options import (
    ARCHS,
    CHECKPOINT_POLICIES,
    HEADS,
    KERNELS,
    METHODS,
    SKETCH_LAYERS,
    SKETCHED_KINDS,
    ModelConfig,
    SketchConfig,
)
from basis_train.core.saved_activations import selective_contexts
from basis_train.core.sketch import check_rank, draw_seed

_GPT2_STD = 0.02
# trunc_normal_ at +-2 std has std 0.8796...; Flax's lecun_normal divides it out.
_TRUNC_STD = 0.87962566103423978


@dataclass(frozen=True)
class GPTConfig(ModelConfig):
    """What the model is built from: the architecture, plus which linear layers are sketched and how."""

    sketch: SketchConfig = SketchConfig()
    exact: bool = False  # True: the same network with every layer exact (the baseline)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.sketch.layers not in SKETCH_LAYERS:
            raise ValueError(f"sketch layers must be one of {SKETCH_LAYERS}, got {self.sketch.layers!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        check_rank(self.sketch.rank)
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head_kernel not in KERNELS:
            raise ValueError(f"head_kernel must be one of {KERNELS}, got {self.head_kernel!r}")
        if self.head_chunk < 1:
            raise ValueError(f"head_chunk must be >= 1, got {self.head_chunk!r}")
        if self.checkpoint_policy not in CHECKPOINT_POLICIES:
            raise ValueError(f"checkpoint_policy must be one of {CHECKPOINT_POLICIES}, got {self.checkpoint_policy!r}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every!r}")


def _linear(cfg: GPTConfig, n_in: int, n_out: int, bias: bool, sketched: bool) -> nn.Linear:
    if not sketched or cfg.exact:
        return nn.Linear(n_in, n_out, bias=bias)
    return BasisLinear(
        n_in, n_out, bias=bias, rank=cfg.sketch.rank, sketch=cfg.sketch.hashing,
        invariant_scalars=cfg.sketch.invariant_scalars, lam=cfg.sketch.lam,
    )


def _head(cfg: GPTConfig) -> nn.Linear:
    sketched = "head" in SKETCHED_KINDS[cfg.sketch.layers] and not cfg.exact
    if cfg.head == "plain":
        return _linear(cfg, cfg.n_embd, cfg.vocab_size, False, sketched)
    if not sketched:
        return FusedHead(cfg.n_embd, cfg.vocab_size, chunk=cfg.head_chunk, kernel=cfg.head_kernel)
    s = cfg.sketch
    return FusedBasisHead(cfg.n_embd, cfg.vocab_size, chunk=cfg.head_chunk, kernel=cfg.head_kernel, rank=s.rank,
                          sketch=s.hashing, invariant_scalars=s.invariant_scalars, lam=s.lam)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        sk = "attn" in SKETCHED_KINDS[cfg.sketch.layers]
        d = cfg.n_embd
        self.n_head = cfg.n_head
        if cfg.arch == "gpt2":  # one product for q, k and v: one sketchable layer
            self.qkv = _linear(cfg, d, 3 * d, True, sk)
        else:
            self.q = _linear(cfg, d, d, True, sk)
            self.k = _linear(cfg, d, d, True, sk)
            self.v = _linear(cfg, d, d, True, sk)
        self.out = _linear(cfg, d, d, True, sk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).split(d, dim=2) if hasattr(self, "qkv") else (self.q(x), self.k(x), self.v(x))
        heads = [p.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for p in qkv]
        y = F.scaled_dot_product_attention(*heads, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        sk = "mlp" in SKETCHED_KINDS[cfg.sketch.layers]
        hidden = cfg.mlp_ratio * cfg.n_embd
        self.fc = _linear(cfg, cfg.n_embd, hidden, True, sk)
        self.proj = _linear(cfg, hidden, cfg.n_embd, True, sk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd, eps=_ln_eps(cfg))
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd, eps=_ln_eps(cfg))
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=_ln_eps(cfg))
        self.lm_head = _head(cfg)
        if cfg.arch == "gpt2":
            self.lm_head.weight = self.wte.weight  # tied: one (vocab, n_embd) parameter
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """The architecture's initialisation from a private CPU generator, so weights depend on the seed only."""
        gen = torch.Generator().manual_seed(seed)
        if self.cfg.arch == "gpt2":
            self._gpt2_init(gen)
            return
        for module in self.modules():  # registration order: identical for every method
            if isinstance(module, nn.Linear):
                std = 1.0 / math.sqrt(module.in_features) / _TRUNC_STD
                w = torch.empty(module.weight.shape)
                nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std, generator=gen)
                module.weight.copy_(w)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                # docs/paper.md: both tables N(0, 0.125) at width 64, i.e. 1/sqrt(width).
                w = torch.empty(module.weight.shape)
                nn.init.normal_(w, std=self.cfg.n_embd**-0.5, generator=gen)
                module.weight.copy_(w)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def _gpt2_init(self, gen: torch.Generator) -> None:
        residual_std = _GPT2_STD / math.sqrt(2 * self.cfg.n_layer)
        for name, module in self.named_modules():  # registration order: identical for every method
            if name == "lm_head":
                continue  # tied to wte, initialised there
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith((".attn.out", ".mlp.proj")) else _GPT2_STD
                w = torch.empty(module.weight.shape)
                nn.init.normal_(w, std=std, generator=gen)
                module.weight.copy_(w)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def no_decay(self, name: str, p: nn.Parameter) -> bool:
        """Parameters weight decay leaves alone: none in the paper's model (it decays every
        parameter, as its reference does); GPT-2's recipe decays only matrices (>= 2-D)."""
        return self.cfg.arch == "gpt2" and p.dim() < 2

    def draw_sketch_seeds(self, generator: torch.Generator | None) -> None:
        """Draw this step's sketch seeds now, one per sketching layer, in the order a forward
        draws them (registration order), so the stream is the one a plain forward draws.

        The training step calls this before the (compiled) forward: the seeds are then inputs
        of the graph, never drawn inside it, so no recompute (AOTAutograd's, a checkpointed
        block's) can draw them again. `clear_sketch_seeds` after the backward."""
        for m in self.sketched_modules():
            if m.sketching():
                m.seed = draw_seed(m.weight.device, generator)

    def clear_sketch_seeds(self) -> None:
        for m in self.sketched_modules():
            m.seed = None

    def sketched_modules(self) -> list[BasisLinear]:
        return [m for m in self.modules() if isinstance(m, BasisLinear)]

    def sketch_generator(self, seed: int) -> torch.Generator:
        """A generator seeded `seed`, on the model's device, that every sketched layer draws its
        per-step seeds from (one stream for the model); returned for the training step to hold."""
        gen = torch.Generator(device=next(self.parameters()).device).manual_seed(seed)
        for m in self.sketched_modules():
            m.generator = gen
        return gen

    def sketchable_names(self) -> list[str]:
        """Names of the linear layers that `sketch.layers` selects (even if exact here)."""
        names = []
        for name, m in self.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            kind = "head" if name == "lm_head" else "mlp" if ".mlp." in name else "attn"
            if kind in SKETCHED_KINDS[self.cfg.sketch.layers]:
                names.append(name)
        return names

    def memory_categories(self) -> tuple[dict[str, str], str]:
        """For the memory meter (core/memory.py): the category of what each submodule saves
        while it runs ("name:out": of the output a selective checkpoint keeps), and the module
        after which the root's own saves belong to the head."""
        # named_modules lists an MLP before its layers: what it sets first stands (setdefault)
        cats = {"": "width_d", "lm_head": "head"}  # the root saves checkpointed blocks' inputs
        for name, m in self.named_modules():
            if isinstance(m, CausalSelfAttention):
                cats[name] = "attention"  # the attention kernel's q, k, v, output and statistics
            elif isinstance(m, MLP):  # GELU's input, proj's input: fc's output, the hidden activation
                cats[name] = cats[f"{name}.proj"] = cats[f"{name}.fc:out"] = "mlp_hidden"
            elif isinstance(m, (nn.LayerNorm, nn.Linear)):
                cats.setdefault(name, "width_d")  # inputs of width n_embd (the residual stream, attention's output)
            if isinstance(m, nn.Linear):  # a selective checkpoint keeps a linear layer's output
                cats.setdefault(f"{name}:out", "width_d")
        return cats, "ln_f"

    def head_kernel_ran(self) -> str | None:
        """The fused head's kernel in its last loss ("cce" | "native" | "forward-grad"); None for the plain head
        or before any fused loss was computed."""
        return getattr(self.lm_head, "kernel_ran", None)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        if t > self.cfg.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.cfg.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        checkpointing = self.cfg.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if checkpointing and i % self.cfg.checkpoint_every == 0:  # blocks 0, k, 2k, ...
                x = _checkpointed(block, x, self.cfg.checkpoint_policy)
            else:
                x = block(x)
        h = self.ln_f(x)
        if targets is not None and isinstance(self.lm_head, (FusedHead, FusedBasisHead)):
            return None, self.lm_head.loss(h, targets)  # the fused head never forms the full logits
        logits = self.lm_head(h)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


def _ln_eps(cfg: GPTConfig) -> float:
    return 1e-5 if cfg.arch == "gpt2" else 1e-6


def _sketching(block: Block) -> list[BasisLinear]:
    """The block's layers that draw a sketch seed in a training forward, in the order they run."""
    return [m for m in block.modules() if isinstance(m, BasisLinear) and m.training and m.weight.requires_grad]


def _run_with_seeds(block: Block, x: torch.Tensor, seeds: list[torch.Tensor]) -> torch.Tensor:
    layers = _sketching(block)
    for m, s in zip(layers, seeds):
        m.seed = s
    try:
        return block(x)
    finally:
        for m in layers:
            m.seed = None


def _checkpointed(block: Block, x: torch.Tensor, policy: str = "full") -> torch.Tensor:
    """Checkpoint a block; its sketches reuse the forward's seeds when backward recomputes it.
    `policy` (CHECKPOINT_POLICIES): full recomputes every op of the block in backward; selective
    keeps its matmul and attention outputs (core/saved_activations.py).

    Checkpointing restores torch's global RNG for the recompute, not the sketch's private
    generator, so the recompute would draw new seeds and the stream would drift from a plain
    run's. The block's seeds are drawn here, in the order its layers run (registration order),
    as a plain forward draws them, and handed to both the forward and the recompute.
    """
    layers = _sketching(block)
    kw = {"context_fn": selective_contexts} if policy == "selective" else {}
    if all(m.seed is not None for m in layers):  # drawn by the training step: the recompute reads them too
        return checkpoint(block, x, use_reentrant=False, **kw)
    seeds = [draw_seed(x.device, m.generator) for m in layers]
    return checkpoint(_run_with_seeds, block, x, seeds, use_reentrant=False, **kw)


def build_gpt(cfg: GPTConfig, seed: int, method: str = "basis") -> GPT:
    """`method="exact"` builds the same network, same weights, with every layer exact."""
    if method not in METHODS:
        raise ValueError(f"method must be 'basis' or 'exact', got {method!r}")
    return GPT(replace(cfg, exact=method == "exact"), seed=seed)
