"""Run assembly: the config layer and the model layer agree on the paper's defaults."""

from basis_train.core.model import GPTConfig
from basis_train.training.config import load_config
from basis_train.training.setup import gpt_config


def test_default_config_builds_the_default_model():
    # GPTConfig extends the config's ModelConfig, but its sketch fields and SketchConfig (what
    # users set) each spell out the paper's estimator defaults; this keeps them from drifting apart.
    assert gpt_config(load_config(None)) == GPTConfig()
