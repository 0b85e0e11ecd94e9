"""Where a paper-size fleet step's time goes on a GPU: the held-out Table 3 fleet (30 members by
default, scripts/fleet_opcount.py's `paper_fleet`) timed as fleet/loop.py runs it (FleetStep,
one CUDA-graph replay per step), then a torch.profiler table of eager steps by kernel.

    python scripts/fleet_profile.py [MEMBERS_PER_CONFIG] [REPLAYS] > profile.txt

Prints ms per graphed fleet step (CUDA events over REPLAYS replays after a warm-up) and, per
kernel name, the CUDA time per eager step and the launches per step. Eager kernel times leave
out the launch gaps a graph removes, so their sum is below an eager step's wall time; it is
the GPU work a replay cannot avoid.
"""

import sys

import torch
from fleet_opcount import paper_fleet
from torch.profiler import ProfilerActivity, profile

from basis_train.fleet.loop import FleetStep


def main(per_config: int = 5, replays: int = 200) -> None:
    dev = torch.device("cuda")
    fleet, opt, cfg = paper_fleet(per_config, "cuda")
    t = cfg.model.block_size
    chunks = torch.randint(0, cfg.model.vocab_size, (4096, t + 1), device=dev, dtype=torch.int32)
    gen = torch.Generator(device=dev).manual_seed(0)

    def batch():
        return torch.randint(0, chunks.shape[0], (fleet.size, cfg.train.batch_size), device=dev, generator=gen)

    graphed = FleetStep(fleet, opt, chunks, dev, use_graphs=True)
    for _ in range(20):
        graphed(batch())
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graphed(batch())
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / replays
    print(f"fleet of {fleet.size}: {ms:.3f} ms per graphed fleet step ({replays} replays), "
          f"{ms / fleet.size:.4f} ms per member-step; graph: {graphed.graph is not None}")

    eager = FleetStep(fleet, opt, chunks, dev, use_graphs=False)
    for _ in range(3):
        eager(batch())
    torch.cuda.synchronize()
    n = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            eager(batch())
        torch.cuda.synchronize()
    rows = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            r = rows.setdefault(e.name, [0.0, 0])
            r[0] += e.device_time
            r[1] += 1
    total = sum(r[0] for r in rows.values()) / n / 1000
    launches = sum(r[1] for r in rows.values()) / n
    print(f"eager: {total:.3f} ms of kernel time and {launches:.0f} kernels per step")
    for name, (us, k) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:40]:
        print(f"  {us / n / 1000:8.3f} ms {k / n:6.1f}x  {name[:110]}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
