"""`python scripts/bench.py ARGS` is `basis-bench ARGS`, also from a checkout that was never pip-installed."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from basis_train.experiments.bench import main

main()
