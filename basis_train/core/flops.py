"""Model FLOPs utilisation, by nanoGPT's count (Chinchilla appendix / PaLM appendix B).

Training FLOPs per token = 6 N + 12 L H Q T: N the parameters without the position table
(the matmul weights, with a tied head counted once), and the attention score and value
products 12 L H Q T (H heads of size Q over T positions). These are the exact model's FLOPs:
BASIS runs are charged the same count, so their MFU says how fast the same model trains, not
how busy the GPU is (BASIS skips most of the sketched layers' dW products).
"""

from __future__ import annotations

from torch import nn

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def flops_per_token(model: nn.Module, n_layer: int, n_head: int, n_embd: int, seq: int) -> float:
    n = sum(p.numel() for name, p in model.named_parameters() if "wpe" not in name)
    return 6 * n + 12 * n_layer * n_head * (n_embd // n_head) * seq


def peak_flops(gpu_name: str | None) -> tuple[float | None, str | None]:
    """(peak FLOP/s, what it is) for a GPU name as torch.cuda.get_device_name gives it."""
    for key, peak in PEAK_BF16.items():
        if gpu_name and key in gpu_name:
            return peak, f"{key} bf16 dense peak {peak / 1e12:.0f} TFLOP/s"
    return None, None


def mfu(tokens_per_s: float, per_token: float, gpu_name: str | None) -> float | None:
    peak, _ = peak_flops(gpu_name)
    return None if peak is None else tokens_per_s * per_token / peak
