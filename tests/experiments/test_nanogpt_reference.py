"""scripts/nanogpt_reference.py's plumbing with a tiny stand-in for nanoGPT's model.py: this project's
shuffled batches of the seed, its lr schedule, its evaluation, and a run directory the report pairs."""

import json
import sys

import pytest
import torch

from basis_train.data.loaders import TrainLoader, heldout_batches
from basis_train.training.config import apply_overrides, load_config
from basis_train.training.setup import load_data, lr_multiplier
from tests.scripts_module import load_script

TINY = """
model: {block_size: 16, n_embd: 16, n_head: 2, n_layer: 1}
optim: {name: adamw, lr: 1.0e-3, schedule: cosine, warmup_steps: 2, weight_decay: 0.1, grad_clip: 1.0}
train: {steps: 6, batch_size: 2, eval_every: 3, checkpoint_every: 3, device: cpu}
data: {heldout_min_tokens: 1000, eval_batch_size: 16}
"""
# nanoGPT's interface (GPTConfig, GPT.forward(idx, targets) -> (logits, loss), configure_optimizers),
# a model small enough for a CPU test; it records the first token of each training row it sees.
STAND_IN = '''
from dataclasses import dataclass
import torch, torch.nn as nn, torch.nn.functional as F
SEEN = []

@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.ln = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx, targets=None):
        if self.training:
            SEEN.append(idx[:, 0].tolist())
        logits = self.head(self.ln(self.wte(idx)))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        decay = [p for p in self.parameters() if p.dim() >= 2]
        rest = [p for p in self.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": rest, "weight_decay": 0.0}], lr=learning_rate, betas=betas)
'''


@pytest.fixture(scope="module")
def script():
    return load_script("nanogpt_reference")


@pytest.fixture
def reference(tmp_path, small_corpus, script):
    (tmp_path / "model.py").write_text(STAND_IN)
    (tmp_path / "tiny.yaml").write_text(TINY)
    summary = script.main(["--model-py", str(tmp_path / "model.py"), "--out", str(tmp_path / "grid" / "nanogpt-s0"),
                           "--config", str(tmp_path / "tiny.yaml"), "--data-files", str(small_corpus), "--no-compile"])
    cfg = apply_overrides(load_config(tmp_path / "tiny.yaml"), {"data.data_files": str(small_corpus)})
    return summary, cfg, sys.modules["nanogpt_model"]


def test_trains_on_the_projects_shuffled_batches_and_schedule(reference, tmp_path):
    summary, cfg, model_module = reference
    splits, _ = load_data(cfg)
    loader = TrainLoader(splits.train_tokens, 2, 16, "cpu", shuffle=True, seed=0)
    assert model_module.SEEN == [loader.next()[0][:, 0].tolist() for _ in range(6)]
    metrics = [json.loads(x) for x in (tmp_path / "grid" / "nanogpt-s0" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 6]
    assert [m["lr"] for m in metrics] == pytest.approx([1e-3 * lr_multiplier(cfg, s) for s in (2, 5)])
    assert summary["method"] == "nanogpt" and summary["data_order"] == "shuffled" and summary["seed"] == 0
    assert summary["data"]["n_train_chunks"] == loader.n_chunks
    assert summary["stream_fraction"] == pytest.approx(6 * 2 / loader.n_chunks)


def test_evaluates_as_basis_train_does(reference, script):
    from basis_train.training.distributed import Dist
    from basis_train.training.evaluate import Evaluator

    _, cfg, model_module = reference
    splits, _ = load_data(cfg)
    torch.manual_seed(0)
    model = model_module.GPT(model_module.GPTConfig(block_size=16, vocab_size=50257, n_embd=16))
    ours = Evaluator(model, splits.val_tokens, cfg, torch.device("cpu"), torch.float32, Dist())()
    theirs = script.evaluate(model, heldout_batches(splits.val_tokens, 16, 16, "cpu"), torch.float32,
                             torch.device("cpu"))
    # float32 means of ~16 x 16 terms, re-weighted: agreement to float32 rounding of a ~10 nat loss
    assert theirs == pytest.approx(ours, rel=1e-6)


def test_the_report_pairs_it_with_exact(reference, tmp_path, small_corpus):
    from basis_train.reporting.scale import write_report
    from basis_train.training.train import Run

    _, cfg, _ = reference
    Run(apply_overrides(cfg, {"train.method": "exact"}), tmp_path / "grid" / "exact-s0", progress=False).run()
    write_report(tmp_path / "grid", tmp_path / "report")
    md = (tmp_path / "report" / "summary.md").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| nanogpt |"))
    assert "(1 seed, no CI)" in line  # paired with exact of the same protocol and seed
