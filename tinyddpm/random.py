"""The one random generator behind parameter initialisation and dropout.

An explicit NumPy ``Generator`` (drawn on the host, then moved to the device) keeps runs
reproducible on every device, and its state goes into checkpoints so a resume is bit-exact.
"""
import numpy as np

_generator = np.random.default_rng(0)


def manual_seed(seed):
    global _generator
    _generator = np.random.default_rng(seed)


def generator():
    return _generator


def get_state():
    return _generator.bit_generator.state


def set_state(state):
    _generator.bit_generator.state = state
