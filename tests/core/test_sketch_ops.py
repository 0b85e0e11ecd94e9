"""core/sketch_ops.py: which operator serves a sketch, and what importing the model costs."""

import subprocess
import sys

import torch

from basis_train.core import sketch_ops
from basis_train.core.sketch import SketchSpec, scaled_sketch

from tolerance import assert_fp32_sum_close


def test_importing_the_model_loads_neither_dynamo_nor_triton():
    # The CLI imports the model for every command; torch.compile's machinery (and Triton with it) is
    # loaded only by what uses it.
    code = ("import sys, basis_train.core.model; "
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_cpu_sketches_take_the_opaque_ops_and_equal_scaled_sketch():
    m, seed, spec = torch.randn(50, 7), torch.tensor(99), SketchSpec(rank=8)
    assert not sketch_ops._fused(m, spec.kind)  # the triton ops serve CUDA tensors only
    assert torch.equal(sketch_ops.sketch_op(m, seed, 8, spec), scaled_sketch(m, seed, spec))
    sk, cs = sketch_ops.sketch_colsum_op(m, seed, 8, spec)
    assert torch.equal(sk, scaled_sketch(m, seed, spec))
    assert_fp32_sum_close(cs, m.double().sum(0), m.double().abs().sum(0), 50, "column sums")
