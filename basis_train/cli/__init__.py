"""The five commands (basis-train, basis-compare, basis-reproduce, basis-diagnose, basis-bench).

Kept empty so that `python -m basis_train.cli` (one training run, the grids' child process) loads
only what a training run needs; each command lives in its own module."""
