"""`featureshift train`: fine-tuning with snapshots of the network before training and after every K epochs.

config (TrainConfig, TOML files, validation, the learning-rate schedule), cutoff (which layers
freeze), loop (one epoch of training, one evaluation, the optimizer and the data loaders), state
(what resuming needs: weights, optimizer, RNG) and session (a fresh run or a resumed one: `train`).
"""
