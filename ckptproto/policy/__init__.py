"""The policy layer: when to save, what to keep, where to resume from.

Works with any training loop that calls a few hooks (see docs/policy.md)::

    from ckptproto import CallbackCollection, CheckpointCallback, CheckpointParameters, TrainState

    state = TrainState(models={"model": model}, optimizers={"optimizer": opt})
    callbacks = CallbackCollection([CheckpointCallback(CheckpointParameters(root_dir="ckpt"))])
"""
