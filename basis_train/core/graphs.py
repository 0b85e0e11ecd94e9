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

from basis_train.torch_floor import torch_release


class GraphSupportError(RuntimeError):
    pass


def registers_generators_itself(version: str | None = None) -> bool:
    """torch >= 2.14 registers every generator a capture draws from on first use, and its
    register_generator_state is a deprecated no-op that warns on every call."""
    return torch_release(version or torch.__version__) >= (2, 14)  # the torch running, not the one installed


def check_graph_support() -> None:
    """Replaying a graph with a private generator needs CUDAGraph.register_generator_state
    (or a torch that registers generators itself)."""
    if not registers_generators_itself() and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        raise GraphSupportError(
            f"CUDA graphs with a private sketch generator need CUDAGraph.register_generator_state, "
            f"which this torch ({torch.__version__}) lacks; upgrade torch or pass --no-cuda-graphs"
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
    if not registers_generators_itself():
        for gen in generators:
            graph.register_generator_state(gen)
    with torch.cuda.graph(graph, pool=pool):
        step()
    graph.replay()
    return graph
