"""One training step (forward, backward, optimiser), eager or as a CUDA-graph replay.

On CUDA (one process, not compiled) the step is captured once after a few eager warm-up
steps and then replayed: no host synchronisation happens between evaluations, which is
what makes a 64-token model fast. For the same reason the training loss is summed on the
device and read only when the loop logs it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch

from basis_train.core import graphs, memory
from basis_train.core.saved_activations import SavedActivations
from basis_train.training.errors import RunError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_EAGER_BEFORE_CAPTURE = 3
# The allocator peak is taken on this (0-based) step: the steps before it allocate optimizer
# state and library workspaces, so the peak on it is the steady-state step's.
_MEASURE_AT_STEP = 2
MEMORY_FIELDS = ("activation_bytes", "weight_cast_bytes", "activation_breakdown", "offloaded_bytes", "step_peak_bytes")


class NonFiniteLoss(RunError):
    pass


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


class GraphDispatch:
    """How a step runs: `_EAGER_BEFORE_CAPTURE` eager calls on a side stream (lazy initialisation,
    such as optimiser state and cuBLAS workspaces, happens outside the graph), then, with
    `use_graphs`, one capture of `fwd_bwd_opt` on a static index buffer, replayed from then on.
    TrainStep and the fleet's FleetStep each hold one and give it their step's parts."""

    def __init__(self, device: torch.device, use_graphs: bool, *, fwd_bwd_opt: Callable[[torch.Tensor], None],
                 eager_step: Callable[[torch.Tensor], None], zero_grad: Callable[[], None],
                 generators: Callable[[], list[torch.Generator]],
                 capture_allowed: Callable[[], bool] = lambda: True) -> None:
        self.device, self.use_graphs = device, use_graphs
        self.fwd_bwd_opt, self.eager_step, self.zero_grad = fwd_bwd_opt, eager_step, zero_grad
        self.generators, self.capture_allowed = generators, capture_allowed
        self.graph = None
        self.idx_buf: torch.Tensor | None = None
        self.eager_steps = 0

    def __call__(self, idx: torch.Tensor) -> None:
        if self.graph is not None:
            self.idx_buf.copy_(idx)
            self.graph.replay()
            return
        with graphs.side_stream(self.device, self.use_graphs):
            if self.use_graphs and self.eager_steps >= _EAGER_BEFORE_CAPTURE and self.capture_allowed():
                self.idx_buf = idx.clone()
                self.zero_grad()
                self.graph = graphs.capture(lambda: self.fwd_bwd_opt(self.idx_buf), generators=self.generators())
            else:
                self.eager_step(idx)
        self.eager_steps += 1


class TrainStep:
    """Calls of `step(idx)` train on the chunks `idx` of `chunks`; the first eager calls also
    measure memory (`measured`, see `_measured_step`).

    float16 gradients underflow without loss scaling, so float16 steps go through a
    GradScaler: a step whose gradients hold an inf or NaN is skipped and the scale lowered.
    The scaler reads that verdict on the host, so a float16 step is never graph-captured.

    `saved_activations` (SAVED_ACTIVATIONS): what the forward keeps of the tensors autograd saves
    (core/saved_activations.py), whose hooks are installed around the forward.
    """

    def __init__(self, model, forward, opt, chunks: torch.Tensor, gen: torch.Generator,
                 device: torch.device, dtype: torch.dtype, use_graphs: bool, grad_clip: float = 0.0,
                 eager_forward=None, saved_activations: str = "keep") -> None:
        self.model, self.forward, self.opt, self.chunks = model, forward, opt, chunks
        # The memory meter's step runs this (uncompiled) forward: its hooks see each module.
        self.eager_forward = eager_forward or forward
        self.grad_clip = float(grad_clip)
        self.saving = SavedActivations(saved_activations, model.parameters())
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.gen, self.device, self.dtype = gen, device, dtype
        self.scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        if use_graphs and self.scaler is not None:
            raise ValueError("a float16 step (GradScaler) cannot be graph-captured")
        self.use_graphs = use_graphs
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_n = 0
        self.measured: dict = {}
        self.step_peak = memory.step_peak_bytes  # injectable: the tests check when it runs
        self.dispatch = GraphDispatch(device, use_graphs, fwd_bwd_opt=self._fwd_bwd_opt, eager_step=self._eager_step,
                                      zero_grad=lambda: self.opt.zero_grad(set_to_none=True),
                                      generators=lambda: [self.gen], capture_allowed=self._capture_allowed)

    def __call__(self, idx: torch.Tensor) -> None:
        self.dispatch(idx)
        self.loss_n += 1

    def drop_forwards(self) -> None:
        """Let go of the forwards (a DDP wrapper among them) once training is over, so that the
        process group is freed where its owner closes it (training/train.py)."""
        self.forward = self.eager_forward = None

    @property
    def graph(self):
        """The captured step's graph once there is one (None: the step runs eagerly)."""
        return self.dispatch.graph

    def _fwd_bwd_opt(self, idx: torch.Tensor, forward=None, hooks=None) -> None:
        chunks = self.chunks[idx]
        x, y = chunks[:, :-1].long(), chunks[:, 1:].long()
        # Seeds drawn here, outside any compiled graph (inside a captured CUDA graph, whose replay
        # draws them anew): the same stream a plain forward draws, and nothing can redraw them.
        self.model.draw_sketch_seeds(self.gen)
        try:
            # `hooks`: the memory meter's, which install the saving method's own (see _measured_step)
            with autocast(self.device, self.dtype), (hooks if hooks is not None else self.saving.hooks()):
                _, loss = (forward or self.forward)(x, y)
            if self.scaler is None:
                loss.backward()
                self._clip()
                self.opt.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.opt)
                self._clip()
                self.scaler.step(self.opt)  # skipped if a gradient is not finite
                self.scaler.update()
        finally:
            self.model.clear_sketch_seeds()
        self.loss_sum += loss.detach()

    def _clip(self) -> None:
        # foreach norms and an in-place scale: no host synchronisation, so a graph can hold it
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self._params, self.grad_clip, foreach=True)

    def _eager_step(self, idx: torch.Tensor) -> None:
        if self._wants_measure():
            self._measured_step(idx)
        else:
            self._plain_step(idx)

    def _plain_step(self, idx: torch.Tensor, forward=None, hooks=None) -> None:
        self._fwd_bwd_opt(idx, forward, hooks)
        self.opt.zero_grad(set_to_none=True)

    def _capture_allowed(self) -> bool:
        return not self._wants_measure()  # a step that measures memory runs eagerly

    def _wants_measure(self) -> bool:
        if "activation_bytes" not in self.measured:
            return True
        return "step_peak_bytes" not in self.measured and self.dispatch.eager_steps >= _MEASURE_AT_STEP

    def _measured_step(self, idx: torch.Tensor) -> None:
        """An eager step that also measures memory (definitions in core/memory.py).

        What is saved for backward is the same on every step, so the first step counts it.
        The allocator peak needs a steady-state step, and one without the meter's own
        transient copies (its cast checks), so it is taken on a later step of its own.
        Saved-tensor hooks nest and only the innermost apply, so the meter installs the saving
        method's hooks itself and counts what they keep; the step installs none of its own."""
        if "activation_bytes" not in self.measured:
            meter = memory.SavedTensorMeter(self.model, saving=self.saving)
            with meter.measure() as m:
                self._plain_step(idx, self.eager_forward, hooks=nullcontext(m))
            self.measured = meter.fields()  # a checkpoint's fields from before issue 16 are dropped
        else:
            self.measured["step_peak_bytes"] = self.step_peak(lambda: self._plain_step(idx), self.device)

    # ------------------------------------------------------------------ loss
    def take_mean_loss(self, dist, step: int) -> float:
        """The global mean training loss since the last call (a collective), then reset."""
        # The one place per-process losses meet: every process gets the same global mean, so a
        # non-finite check on it fails on all processes or on none.
        loss = dist.all_sum(self.loss_sum.clone()).item() / (max(self.loss_n, 1) * dist.world_size)
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"non-finite training loss between steps {step - self.loss_n} and {step}")
        self.loss_sum.zero_()
        self.loss_n = 0
        return loss

    def running_loss(self) -> float | None:
        """This process's mean training loss since the last logged one (a host sync); None before a step."""
        return self.loss_sum.item() / self.loss_n if self.loss_n else None

    def finite(self) -> bool:
        norms = torch._foreach_norm([p.detach() for p in self.model.parameters()])
        return math.isfinite(self.loss_sum.item()) and bool(torch.isfinite(torch.stack(norms)).all())

    # ------------------------------------------------------------------ state
    def shared_state(self) -> dict:
        """What every process holds alike (process 0's copy is saved)."""
        state = {"model": self.model.state_dict(), "optim": self.opt.state_dict(), "loss_n": self.loss_n,
                 "measured": self.measured}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def own_state(self) -> dict:
        """What differs between processes: each continues its own sketch stream and loss sum."""
        return {"gen": self.gen.get_state(), "loss_sum": self.loss_sum.item()}

    def load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        lrs = [g["lr"] for g in self.opt.param_groups]
        self.opt.load_state_dict(ckpt["optim"])
        for g, lr in zip(self.opt.param_groups, lrs, strict=True):
            if isinstance(lr, torch.Tensor):  # keep the device lr a graph reads (the load gives a CPU one)
                g["lr"] = lr
        self.gen.set_state(ckpt["gen"])
        self.loss_sum.fill_(ckpt["loss_sum"])
        self.loss_n, self.measured = ckpt["loss_n"], ckpt["measured"]
        if self.scaler is not None and "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
