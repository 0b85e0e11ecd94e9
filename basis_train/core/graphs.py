"""Whole-step CUDA-graph capture: one recipe for the training loop, the bench and the tests.

PyTorch's recipe: run a few eager steps on a side stream first (lazy allocations such as
optimiser state and cuBLAS workspaces must happen outside the graph), then capture one
step with gradients set to None, so the captured backward writes them into the graph's
memory pool instead of accumulating into tensors allocated elsewhere.

Random streams: a generator that the step draws from (the sketch's) must be registered
with the graph, or every replay would reuse the random numbers frozen at capture time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch


class GraphSupportError(RuntimeError):
    pass


def check_graph_support() -> None:
    """Replaying a graph with a private generator needs CUDAGraph.register_generator_state."""
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        raise GraphSupportError(
            f"CUDA graphs with a private sketch generator need torch >= 2.5 "
            f"(CUDAGraph.register_generator_state); this is torch {torch.__version__}. "
            "Upgrade torch or pass --no-cuda-graphs."
        )


@contextmanager
def side_stream(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Run the body on a fresh stream that is ordered after and before the current one."""
    if not enabled or device.type != "cuda":
        yield
        return
    main = torch.cuda.current_stream(device)
    side = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)


def capture(step: Callable[[], object], generators: Iterable[torch.Generator] = (),
            pool=None) -> torch.cuda.CUDAGraph:
    """Capture `step()` into a CUDA graph and replay it once.

    Capturing records kernels without running them, so the single replay here is the real
    execution of this step. The caller must have set gradients to None beforehand.
    """
    check_graph_support()
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        graph.register_generator_state(gen)
    with torch.cuda.graph(graph, pool=pool):
        step()
    graph.replay()
    return graph
