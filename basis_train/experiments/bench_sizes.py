"""What basis-bench measures: the model sizes, the variants and the single layer. Torch-free, so
that the command's --help and argument checks start without importing torch."""

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
