"""The training chunks' order: shuffled by default for files and fineweb-edu, the stream's order for
the paper protocol; paired within a seed, changed by the seed; recorded in summary.json."""

import numpy as np
import pytest
import torch

from basis_train.training.config import apply_overrides, config_from_dict, config_hash, load_config
from basis_train.training.train import Run


@pytest.mark.parametrize(("data", "shuffled"), [
    ({}, False),  # wiki-offline: the paper's stream order
    ({"dataset": "fineweb-edu"}, True),
    ({"data_files": "x/*.txt"}, True),
    ({"data_files": "x/*.txt", "shuffle": False}, False),
    ({"shuffle": True}, True),
])
def test_shuffle_default_follows_the_dataset(data, shuffled):
    assert config_from_dict({"data": data}).data.shuffled is shuffled


def test_the_default_is_resolved_after_overrides():
    # A config without a dataset, given files on the command line, shuffles them.
    cfg = apply_overrides(load_config("tiny"), {"data.data_files": "x/*.txt"})
    assert cfg.data.shuffle is None and cfg.data.shuffled


def test_paper_config_keeps_the_stream_order():
    cfg = load_config("paper")
    assert cfg.data.shuffle is False and not cfg.data.shuffled
    assert not apply_overrides(cfg, {"data.dataset": "fineweb-edu"}).data.shuffled


def test_an_unset_shuffle_hashes_as_the_order_it_resolves_to():
    # Finished runs recorded an explicit shuffle; a grid asking for the default must find them.
    for data, order in (({}, False), ({"data_files": "x/*.txt"}, True)):
        assert config_hash(config_from_dict({"data": data})) == \
            config_hash(config_from_dict({"data": {**data, "shuffle": order}}))
        assert config_hash(config_from_dict({"data": data})) != \
            config_hash(config_from_dict({"data": {**data, "shuffle": not order}}))


def _run(tmp_path, tiny_config, name, **overrides):
    cfg = apply_overrides(load_config(tiny_config), overrides)
    return Run(cfg, tmp_path / name, progress=False)


def _order(run, steps=6):
    return torch.cat([run.loader.next_indices() for _ in range(steps)]).tolist()


def test_exact_and_basis_of_a_seed_see_the_same_shuffled_order(tmp_path, tiny_config):
    exact = _run(tmp_path, tiny_config, "e", **{"train.method": "exact"})
    basis = _run(tmp_path, tiny_config, "b")
    other = _run(tmp_path, tiny_config, "s1", **{"train.seed": 1})
    n, batch = exact.loader.n_chunks, exact.loader.global_batch
    steps = n // batch - 1  # all of the first pass, after the batch the loader skips
    order = _order(exact, steps)
    assert order == _order(basis, steps)
    # Today's permutation exactly: an outside reference (scripts/nanogpt_reference.py) trains on it.
    assert order == np.random.default_rng([0, 0]).permutation(n)[batch:batch * (steps + 1)].tolist()
    assert order != _order(other, steps)
    assert sorted(order) != order  # not the stream order


def test_summary_records_the_order_and_the_stream_fraction(tmp_path, tiny_config):
    shuffled = _run(tmp_path, tiny_config, "sh", **{"train.steps": 3, "train.eval_every": 3}).run()
    stream = _run(tmp_path, tiny_config, "st", **{"train.steps": 3, "train.eval_every": 3,
                                                   "data.shuffle": False}).run()
    assert shuffled["data_order"] == "shuffled" and stream["data_order"] == "stream"
    chunks = shuffled["data"]["n_train_chunks"]
    assert shuffled["stream_fraction"] == pytest.approx(3 * 1 / chunks)
    assert shuffled["stream_fraction"] == pytest.approx(
        shuffled["tokens_seen"] / (chunks * 16))  # block_size 16: tokens seen / tokens in whole chunks
