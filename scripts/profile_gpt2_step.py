"""Where a GPT-2-small training step's time goes: torch.profiler's table for one configuration.

    python scripts/profile_gpt2_step.py VARIANT HEAD COMPILED [RANK]   e.g.  mlp+head fused 1 256

VARIANT exact | mlp+head | all; HEAD fused | plain; COMPILED 0 | 1. Same step as
scripts/speed_gpt2.py (B 8 x T 1024, bf16 autocast, fused AdamW, clipping 1.0).
"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "scripts")
from speed_gpt2 import SMALL, B, T, _adamw  # noqa: E402

from basis_train.core.model import build_gpt  # noqa: E402
from basis_train.core.options import SketchConfig  # noqa: E402


def main() -> None:
    variant, head, compiled = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    rank = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    import dataclasses
    cfg = dataclasses.replace(SMALL, sketch=SketchConfig(rank=rank, layers="mlp+head" if variant == "exact" else variant),
                              head=head)
    model = build_gpt(cfg, 0, "exact" if variant == "exact" else "basis").cuda()
    fwd = torch.compile(model) if compiled else model
    opt, gen = _adamw(model), torch.Generator(device="cuda").manual_seed(1)
    params = list(model.parameters())
    x = torch.randint(0, 50257, (B, T), device="cuda")

    def step():
        model.draw_sketch_seeds(gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(x, x)[1]
        loss.backward()
        model.clear_sketch_seeds()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"== {variant} {head} compiled={compiled} R={rank}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
