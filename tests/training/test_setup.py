"""Run assembly: the config layer and the model layer agree on the paper's defaults."""

from basis_train.core.model import GPTConfig
from basis_train.training.config import load_config
from basis_train.training.setup import gpt_config


def test_default_config_builds_the_default_model():
    # ModelConfig/SketchConfig (what users set) and GPTConfig (what the model takes) each
    # spell out the paper's defaults; this keeps the two lists from drifting apart.
    assert gpt_config(load_config(None)) == GPTConfig()
