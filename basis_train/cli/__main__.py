"""`python -m basis_train.cli`: one training run, as the grids and torchrun launch it."""

from basis_train.cli.train import main

main()
