"""Ops one paper-size fleet training step dispatches, and the bytes they read and write, by op and
by phase: proxies for what a captured fleet step costs on a GPU (kernel launches, and memory
traffic, which the members' 50257 x 64 vocabulary matrices dominate).

    python scripts/fleet_opcount.py [MEMBERS_PER_CONFIG]

Builds the held-out Table 3 fleet (exact, R = 64, 32, 16, 8, 1; 5 seeds each by default) from
configs/paper.yaml, routes the bins-and-signs expansion, the fused SGD update (one per parameter,
after the first step; the token embedding's from its gradient rows) and the head's log-sum-exp and
softmax-gradient passes to stand-ins counted as the one Triton launch each is on CUDA, takes the batched
head (the CUDA choice), runs forward+backward+SGD steps on CPU and prints the second step's counts.
Views and other metadata-only ops are left out (they launch nothing); the rest count whether or not
they launch a kernel, so the figure is an upper bound on kernels. Bytes: every tensor argument and result of each op, once
(in-place results counted as written), so a rough figure of traffic, not a measurement.
"""

import collections
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from basis_train.core.model import build_gpt
from basis_train.fleet import head as fleet_head
from basis_train.fleet import optim as fleet_optim
from basis_train.fleet import sketch as fleet_sketch
from basis_train.fleet.model import FleetGPT
from basis_train.fleet.optim import FleetSGD
from basis_train.training.config import apply_overrides, load_config
from basis_train.training.setup import gpt_config

NO_KERNEL = {"view", "_unsafe_view", "t", "transpose", "unsqueeze", "squeeze", "expand", "permute", "select",
             "slice", "alias", "detach", "as_strided", "split", "unbind", "_reshape_alias", "reshape", "lift_fresh"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.phase = "forward"
        self.by_phase = collections.Counter()
        self.bytes = collections.Counter()
        self.bytes_by_phase = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name not in NO_KERNEL:
            self.ops[name] += 1
            self.by_phase[self.phase] += 1
            moved = sum(t.numel() * t.element_size() for t in _tensors((args, kwargs, out)))
            self.bytes[name] += moved
            self.bytes_by_phase[self.phase] += moved
        return out


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


def paper_fleet(per_config: int = 5, device: str = "cpu") -> tuple[FleetGPT, FleetSGD, dict]:
    """The held-out Table 3 fleet (exact, R = 64, 32, 16, 8, 1; `per_config` seeds each) from
    configs/paper.yaml, its FleetSGD and the config; scripts/fleet_profile.py times the same fleet."""
    torch.manual_seed(0)
    cfg = load_config("paper")
    members, gens = [], []
    for method, rank in [("exact", 64), ("basis", 64), ("basis", 32), ("basis", 16), ("basis", 8), ("basis", 1)]:
        for seed in range(per_config):
            c = apply_overrides(cfg, {"sketch.rank": rank, "train.method": method, "train.seed": seed})
            members.append(build_gpt(gpt_config(c), seed=seed, method=method))
            gens.append(torch.Generator(device=device).manual_seed(seed) if method == "basis" else None)
    fleet = FleetGPT(members, gens).to(device)
    rows = {fleet.names.index("wte.weight"): fleet.sparse_embedding_grad()}  # as fleet/loop.py
    opt = FleetSGD([fleet.p(n) for n in fleet.names], [[cfg.optim.lr] * fleet.size for _ in fleet.names],
                   cfg.optim.momentum, cfg.optim.weight_decay, sparse=rows)
    return fleet, opt, cfg


def main(per_config: int = 5) -> None:
    fleet, opt, cfg = paper_fleet(per_config)
    fleet.batched_head = True
    counter = Count()
    torch_path = fleet_sketch.FleetSketch.bins_and_signs

    def one_launch(self, seeds, rows, dtype=torch.float32):
        with torch.utils._python_dispatch._disable_current_modes():
            out = torch_path(self, seeds, rows, dtype)
        counter.ops["triton:fleet_bins"] += 1
        counter.by_phase[counter.phase] += 1
        return out

    fleet_sketch.FleetSketch.bins_and_signs = one_launch

    def count(name, tensors):
        counter.ops[name] += 1
        counter.by_phase[counter.phase] += 1
        moved = sum(t.numel() * t.element_size() for t in tensors)
        counter.bytes[name] += moved
        counter.bytes_by_phase[counter.phase] += moved

    class FusedSGD:
        """fleet/kernels/sgd.py's launches: `fleet_sgd_` reads p, grad (if any), buf and lr once and
        writes buf and p once; `fleet_sgd_rows_` reads each gradient row and its index once and reads and
        writes the row of p and buf it updates."""

        @staticmethod
        def supports(p, g, buf):
            return all(t.dtype == torch.float32 and t.is_contiguous() for t in (p, g, buf) if t is not None)

        @staticmethod
        def fleet_sgd_(p, g, buf, lr, momentum, wd):
            with torch.utils._python_dispatch._disable_current_modes():
                d = torch.zeros_like(p) if g is None else g
                d = d + wd * p if wd else d
                if buf is not None and momentum:
                    buf.mul_(momentum).add_(d)
                    d = buf
                p.sub_(d * lr.view(-1, *([1] * (p.dim() - 1))))
            count("triton:fleet_sgd", tuple(t for t in (p, g, lr) if t is not None)
                  + (() if buf is None or not momentum else (buf, buf)) + (p,))

        @staticmethod
        def fleet_sgd_rows_(p, buf, index, rows, lr):
            with torch.utils._python_dispatch._disable_current_modes():
                per = p[0].numel() // p.shape[-1]
                if buf is not None:
                    buf.view(-1, p.shape[-1]).index_add_(0, index, rows)
                p.view(-1, p.shape[-1]).index_add_(0, index, rows * -lr[index // per].unsqueeze(1))
            count("triton:fleet_sgd_rows", (index, rows) + (rows,) * (4 if buf is not None else 2))

    class HeadKernels:
        """fleet/kernels/head.py's launches: `row_lse` reads the logits once, `softmax_grad_` reads
        and writes them once (and reads S)."""

        @staticmethod
        def supports(logits_t, smat):
            return True

        @staticmethod
        def row_lse(logits_t):
            with torch.utils._python_dispatch._disable_current_modes():
                out = torch.logsumexp(logits_t, 1)
            count("triton:row_lse", (logits_t, out))
            return out

        @staticmethod
        def softmax_grad_(logits_t, lse, targets, smat):
            with torch.utils._python_dispatch._disable_current_modes():
                dl = logits_t.sub_(lse.unsqueeze(1)).exp_()
                dl.scatter_add_(1, targets.unsqueeze(1), dl.new_full((targets.shape[0], 1, targets.shape[1]), -1.0))
                sumsq = dl.square().sum((1, 2))
                sksq = None if smat is None else torch.bmm(smat, dl.transpose(1, 2)).square().sum((1, 2))
            count("triton:softmax_grad", (logits_t, logits_t, lse, targets) + (() if smat is None else (smat,)))
            return sumsq, sksq

    fleet_optim.KERNELS.module, fleet_optim.KERNELS.devices = FusedSGD, {"cpu", "cuda"}
    fleet_head.KERNELS.module, fleet_head.KERNELS.devices = HeadKernels, {"cpu", "cuda"}
    t = cfg.model.block_size
    idx = torch.randint(0, cfg.model.vocab_size, (fleet.size, cfg.train.batch_size, t + 1))
    for _ in range(2):  # the second step is the steady state (momentum buffers exist)
        for c in (counter.ops, counter.by_phase, counter.bytes, counter.bytes_by_phase):
            c.clear()
        with counter:
            counter.phase = "forward"
            loss = fleet(idx[..., :-1], idx[..., 1:])
            counter.phase = "backward"
            loss.sum().backward()
            counter.phase = "optimizer"
            opt.step()
            opt.zero_grad()
    print(f"fleet of {fleet.size}: {sum(counter.ops.values())} ops per step; by phase {dict(counter.by_phase)}")
    gb = {k: round(v / 1e9, 2) for k, v in counter.bytes_by_phase.items()}
    print(f"bytes read + written: {sum(counter.bytes.values()) / 1e9:.2f} GB per step; by phase (GB) {gb}")
    for name, n in counter.bytes.most_common(12):
        print(f"  {n / 1e9:6.2f} GB {name} ({counter.ops[name]} ops)")
    for name, n in counter.ops.most_common(25):
        print(f"  {n:5d} {name}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
