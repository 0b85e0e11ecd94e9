"""A GPT training step timed as the training loop runs it on CUDA: one CUDA-graph replay.

Eager timings of a small model measure the host issuing kernels more than the kernels
(see docs/kernels.md); a replayed graph removes the host from the step, so the
two together say how much of a step is launch overhead. The capture is core/graphs.py's,
with a private sketch generator registered as basis-train registers it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from basis_train.core import graphs

_WARMUP_EAGER = 3


def graphed_step(model, make_opt: Callable[[], torch.optim.Optimizer], loss: Callable[[], torch.Tensor],
                 device: torch.device) -> Callable[[], None]:
    """Warm up, capture forward + backward + optimiser step of `model`, and return the replay.

    `make_opt()` must build a capturable optimiser over `model`'s parameters (AdamW needs
    capturable=True to be captured; SGD is capturable as is).
    """
    gen = model.sketch_generator(0)
    opt = make_opt()

    def step() -> None:
        loss().backward()
        opt.step()

    with graphs.side_stream(device):
        for _ in range(_WARMUP_EAGER):
            step()
            opt.zero_grad(set_to_none=True)
    opt.zero_grad(set_to_none=True)
    return graphs.capture(step, generators=[gen]).replay
