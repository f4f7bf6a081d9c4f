"""The training engine behind `featureshift train` (commands/train.py).

config (TrainConfig, TOML files, validation, the learning-rate schedule), cutoff (which layers
freeze), loop (one epoch of training, one evaluation, the optimizer and the data loaders), state
(what resuming needs: weights, optimizer, RNG), distributed (the processes of --nproc and
torchrun), precheck (one training step before the first epoch), messages (notes, warnings,
TensorBoard) and session (a fresh run or a resumed one: `configure`, then `start`). Devices,
precision and core counts follow featureshift.device; the folder a fresh run writes, and whether
a run there may be replaced or started again, featureshift.run.
"""
