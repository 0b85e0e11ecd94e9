import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

# Triton's interpreter runs the sketch kernels on CPU tensors (tests/core/test_sketch_kernels.py).
# It must be switched on before Triton is first imported: its own library functions are
# decorated at import. Without a GPU, compiled Triton cannot run anyway, so nothing is lost.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from basis_train.data.corpus import _wiki_json_path


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Token caches and wandb files of the tests stay in a temporary directory, unless a
    cache is named explicitly (a GPU machine without `datasets` brings one along)."""
    cache = tmp_path_factory.mktemp("cache")
    old = {k: os.environ.get(k) for k in ("BASIS_TRAIN_CACHE", "WANDB_DIR", "WANDB_SILENT")}
    os.environ.update(WANDB_DIR=str(cache), WANDB_SILENT="true")
    os.environ.setdefault("BASIS_TRAIN_CACHE", str(cache))
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first 300 embedded Wikipedia leads as a local .jsonl file (~33k tokens)."""
    docs = list(json.loads(_wiki_json_path().read_text()).values())[:300]
    path = tmp_path_factory.mktemp("corpus") / "wiki300.jsonl"
    path.write_text("".join(json.dumps({"text": f"{d['title']}\n\n{d['extract']}"}) + "\n" for d in docs))
    return path


TINY_YAML = """
model: {{block_size: 16, n_embd: 16, n_head: 2, n_layer: 1}}
sketch: {{rank: 4}}
train: {{steps: 12, eval_every: 4, checkpoint_every: 5, device: cpu}}
data: {{data_files: "{corpus}", heldout_min_tokens: 1000, eval_batch_size: 64, paper_val_docs: 20, paper_val_batches: 4}}
"""


@pytest.fixture()
def tiny_config(tmp_path, small_corpus) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_YAML.format(corpus=small_corpus))
    return path


def load_interpreted_kernel(module: str, gpu_note: str = "with a GPU the compiled kernels are tested instead"):
    """A fresh copy of the kernel module `module` (a dotted name) built under Triton's interpreter (the
    kernel tests route CPU tensors to it). Skips where Triton is missing or a GPU runs the compiled kernel."""
    triton = pytest.importorskip("triton")
    import triton.language as tl

    if torch.cuda.is_available():
        pytest.skip(gpu_note)
    if os.environ.get("TRITON_INTERPRET") != "1" or isinstance(tl.zeros, triton.runtime.JITFunction):
        pytest.fail("Triton was imported before tests/conftest.py could switch on its interpreter")
    package, _, name = module.rpartition(".")
    path = Path(importlib.import_module(package).__file__).parent / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{package}._interpreted_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def interpreted_kernel():
    """`load_interpreted_kernel` for tests: `interpreted_kernel("basis_train.fleet.kernels.sgd")`."""
    return load_interpreted_kernel


@pytest.fixture()
def slow_checkpoint_saves(monkeypatch):
    """`slow_checkpoint_saves(seconds)`: every checkpoint write takes `seconds` longer (a clock test's
    stand-in for writing 1.5 GB at GPT-2 small)."""
    import time

    from basis_train.training.checkpoint import Checkpoints

    real_save = Checkpoints.save

    def slow_down(seconds: float) -> None:
        def slow_save(self, *a, **k):
            time.sleep(seconds)
            return real_save(self, *a, **k)

        monkeypatch.setattr(Checkpoints, "save", slow_save)

    return slow_down
