"""What basis-bench measures: the model sizes, the variants, the single layer and the memory frontier's
methods. Torch-free, so that the command's --help and argument checks start without importing torch."""

VARIANTS = ("exact", "exact+ckpt", "mlp+head", "all")
# bf16: autocast on CUDA (float32 elsewhere). The paper ran float32 on a T4, which has no TF32.
SIZES = {
    "paper": {"name": "paper", "vocab": 50257, "seq": 64, "width": 64, "heads": 2, "layers": 2, "batch": 1,
              "bf16": False, "tf32": False, "optimizer": "sgd", "head_chunk": 256},
    "gpt2-small": {"name": "gpt2-small", "vocab": 50257, "seq": 1024, "width": 768, "heads": 12, "layers": 12,
                   "batch": 8, "bf16": True, "tf32": True, "optimizer": "adamw", "head_chunk": 1024},
}
QUICK = {"vocab": 512, "seq": 32, "width": 32, "heads": 2, "layers": 2, "batch": 2, "head_chunk": 16}
LAYER, LAYER_QUICK = [8192, 768, 3072], [256, 64, 128]

# The memory frontier (experiments/frontier.py): GPT-2 small (configs/gpt2-small.yaml's model) and the
# memory methods it compares, each as config overrides; `{rank}` is BASIS's rank (256; 8 with --quick,
# whose steps have too few rows for R = 256 to sketch anything).
FRONTIER_CONFIG = "gpt2-small"
FRONTIER_RANK, FRONTIER_RANK_QUICK = 256, 8
_CKPT = {"model.checkpoint_blocks": True}
FRONTIER_METHODS: dict[str, tuple[str, dict]] = {
    "exact": ("exact", {"train.method": "exact"}),
    "ckpt": ("full block checkpointing", {"train.method": "exact", **_CKPT}),
    "ckpt-selective": ("selective checkpointing", {"train.method": "exact", **_CKPT,
                                                   "model.checkpoint_policy": "selective"}),
    "ckpt-every2": ("every 2nd block checkpointed", {"train.method": "exact", **_CKPT, "model.checkpoint_every": 2}),
    "offload": ("saved activations offloaded to host", {"train.method": "exact", "train.saved_activations": "offload"}),
    "int8": ("int8 saved activations", {"train.method": "exact", "train.saved_activations": "int8"}),
    "fp8": ("fp8 saved activations", {"train.method": "exact", "train.saved_activations": "fp8"}),
    "basis-mlp+head": ("BASIS mlp+head R={rank}", {"train.method": "basis", "sketch.layers": "mlp+head"}),
    "basis-all": ("BASIS all linears R={rank}", {"train.method": "basis", "sketch.layers": "all"}),
    "basis-mlp+head+ckpt": ("BASIS mlp+head R={rank} + full checkpointing",
                            {"train.method": "basis", "sketch.layers": "mlp+head", **_CKPT}),
    "basis-mlp+head+int8": ("BASIS mlp+head R={rank} + int8 saved activations",
                            {"train.method": "basis", "sketch.layers": "mlp+head", "train.saved_activations": "int8"}),
}
# The two searches: the largest batch at a fixed context, the longest context at batch 1 (a longer
# position table). Sizes are multiples of `step` up to `cap`.
FRONTIER_AXES = {"batch": {"seq": 1024, "cap": 512, "step": 1}, "context": {"batch": 1, "cap": 65536, "step": 256}}
FRONTIER_AXES_QUICK = {"batch": {"seq": 32, "cap": 64, "step": 1}, "context": {"batch": 1, "cap": 1024, "step": 32}}
# Every method also at the GPT-2-small study's size (B 8 x T 1024): its step peak and tokens/s there, the
# points of the methods' memory-speed plot beside the study's quality runs.
FRONTIER_REFERENCE = {"batch": 8, "seq": 1024}
FRONTIER_REFERENCE_QUICK = {"batch": 2, "seq": 32}
