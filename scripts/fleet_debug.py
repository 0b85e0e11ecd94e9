"""Where does a multi-stream fleet of CUDA-graphed runs spend its time? (debug aid)"""
import sys
import time

import torch

from basis_train.core.model import GPTConfig, build_gpt

n = int(sys.argv[1])
method = sys.argv[2]
cfg = GPTConfig(rank=32)
models = [build_gpt(cfg, seed=i, method=method).cuda() for i in range(n)]
opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in models]
idx = torch.randint(0, 50257, (1, 65), device="cuda")
streams = [torch.cuda.Stream() for _ in range(n)]
graphs = []
for m, o, s in zip(models, opts, streams):
    with torch.cuda.stream(s):
        for _ in range(3):
            m(idx[:, :-1], idx[:, 1:])[1].backward()
            o.step()
            o.zero_grad(set_to_none=True)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            m(idx[:, :-1], idx[:, 1:])[1].backward()
            o.step()
        graphs.append(g)
torch.cuda.synchronize()
for _ in range(3):
    t = time.perf_counter()
    for _ in range(200):
        for g, s in zip(graphs, streams):
            with torch.cuda.stream(s):
                g.replay()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(f"{method} n={n}: {dt / 200 * 1000:.3f} ms per lockstep, {dt / 200 / n * 1000:.3f} ms per run-step", flush=True)
