"""What a config may choose, and the model's configuration: torch-free, so that reading a config
(every command's start, --help too) does not import torch."""

from __future__ import annotations

from dataclasses import dataclass

# The kinds of linear layer (attention's, the MLPs', the head) each `sketch.layers` choice sketches.
# mlp: the MLPs only. Sketching the fused head saves no memory (it keeps its input to recompute the logits
# in backward) but adds its noisy dW estimate: mlp against mlp+head shows what that costs.
SKETCHED_KINDS = {"none": (), "mlp": ("mlp",), "mlp+head": ("mlp", "head"), "all": ("attn", "mlp", "head")}
SKETCH_LAYERS = tuple(SKETCHED_KINDS)
ARCHS = ("paper", "gpt2")
METHODS = ("basis", "exact")  # exact: the same network, every layer exact (core/model.py's build_gpt)
HASHINGS = ("balanced", "uniform")
SKETCH_KINDS = (*HASHINGS, "gaussian")
HEADS = ("fused", "plain")
# The fused head's kernel: ours (auto, native), ours with the gradients computed in forward
# (forward-grad: no recompute of the logits; core/head.py), Cut Cross-Entropy (cce; exact head only,
# core/head_cce.py).
KERNELS = ("auto", "native", "cce", "forward-grad")
# Rows per chunk of the fused head: a chunk's float32 logits take chunk x vocab x 4 bytes (51 MiB
# at 256 x 50257). Backward holds about three such buffers at once; larger chunks mean fewer,
# larger matmuls (faster) and more transient memory.
DEFAULT_CHUNK = 256
# What activation memory is split into (core/memory.py's breakdown, the reports' columns).
MEMORY_CATEGORIES = ("head", "attention", "mlp_hidden", "width_d", "sketches", "seeds", "other")
# What a checkpointed block keeps (core/saved_activations.py): full = only its input (every op is
# recomputed in backward); selective = its input and its matmul and attention outputs (the cheap
# pointwise ops are recomputed).
CHECKPOINT_POLICIES = ("full", "selective")
# What a training step keeps of the tensors autograd saves for backward (core/saved_activations.py):
# keep = as they are; offload = copied to host memory (torch.autograd.graph.save_on_cpu); int8 /
# fp8 = compressed to 8 bits with a scale per row, dequantised in backward.
SAVED_ACTIVATIONS = ("keep", "offload", "int8", "fp8")


@dataclass(frozen=True)
class ModelConfig:
    """The network's shape and head: the config file's `model` section (training/config.py checks
    its values and hashes it field by field, so a field renamed or added here changes run hashes)."""

    # paper: the paper's tiny GPT as its reference builds it; gpt2: GPT-2's architecture and
    # initialisation (fused qkv, tied head, residual-scaled init)
    arch: str = "paper"
    vocab_size: int = 50257
    block_size: int = 64
    n_embd: int = 64
    n_head: int = 2
    n_layer: int = 2
    mlp_ratio: int = 4
    checkpoint_blocks: bool = False
    checkpoint_policy: str = "full"  # what a checkpointed block keeps (CHECKPOINT_POLICIES)
    checkpoint_every: int = 1  # with checkpoint_blocks: blocks 0, k, 2k, ... are checkpointed
    head: str = "fused"  # fused: chunked linear + cross-entropy, the logits never kept (core/head.py); or plain
    head_chunk: int = DEFAULT_CHUNK  # rows per chunk of the fused head
    # the exact fused head's kernel: auto and native = ours; cce = Cut Cross-Entropy (CUDA, bf16/fp16)
    # or refuse to start; opt-in because its bf16 gradient sums cost loss (core/head_cce.py)
    head_kernel: str = "auto"


@dataclass(frozen=True)
class SketchConfig:
    """Which linear layers BASIS sketches and how: the config file's `sketch` section, and what the
    model is built with (core/model.py's GPTConfig.sketch). Hashed field by field, as ModelConfig."""

    rank: int = 32
    layers: str = "mlp+head"  # SKETCH_LAYERS
    hashing: str = "balanced"  # SKETCH_KINDS
    invariant_scalars: bool = True
    lam: float = 0.01
