"""One training run: the engine (networks, optimizers, one iteration), the loss and its terms, augmentation,
ramps, the components acting at the steps (logging, samples, checkpoints, evaluation) and the trainer."""
