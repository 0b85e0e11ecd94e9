"""Fused GPU kernels of the sketch (Triton). Import `sketch_triton`, `sketch_gather` or
`fleet_bins` only where Triton is installed."""
