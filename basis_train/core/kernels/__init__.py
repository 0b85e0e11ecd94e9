"""Fused GPU kernels of the sketch (Triton). Import `sketch_triton` only where Triton is installed."""
