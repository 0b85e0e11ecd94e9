"""The fleet's Triton kernels, each imported through a core.kernels.KernelRoute (they need Triton)."""
