"""Fleet mode: many runs of one model shape trained in one process as one batched model.

`loop` (the `Fleet` and `train_fleet`) drives members that are single runs (training/train.py's
`Run`, through its `member()` interface); `model`, `sketch` and `head` are the batched GPT,
its member-batched BASIS sketches and its batched fused head; `optim` is the batched SGD;
`grid` groups a grid's runs into fleets; `kernels/` holds their Triton kernels. This package
uses only public names of basis_train.core and basis_train.training, which never import it.
"""
