import os
import sys

import torch

# Triton's interpreter runs the sketch kernels on CPU tensors (tests/core/test_sketch_kernels.py).
# It must be switched on before Triton is first imported: its own library functions are
# decorated at import. Without a GPU, compiled Triton cannot run anyway, so nothing is lost.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
