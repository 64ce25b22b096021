"""One seed fixes everything: every random stream is derived from (seed, purpose, round, client).

Deriving streams instead of carrying generator state means a resumed run draws exactly what an
uninterrupted one would, and engines (in-process, Flower) draw identical numbers.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    PARTITION = 1001
    GROUPS = 1002
    CLIENT_SAMPLING = 1003
    ALLOCATION = 1004
    LOCAL_TRAINING = 1005
    SPLIT = 1006
    FISHER = 1008
    EVALUATION = 1009
    FRESH_ADAPTERS = 1010  # FLoRA: the adapters every round restarts from
    PRIVACY = 1011  # differential privacy: the noise (server: client key 0; a client: its id + 1)
    SECURE_AGGREGATION = 1012  # secure aggregation: a client's stochastic quantisation


class SplitPart(IntEnum):
    """Sub-streams of `Stream.SPLIT`: the held-out splits draw from the stream itself."""

    SUBSAMPLE = 1  # data.max_examples
    PROXY = 2  # the server's proxy set for Fisher scores


def numpy_rng(seed: int, stream: Stream, *keys: int) -> np.random.Generator:
    """A numpy generator for one purpose (and round/client keys)."""
    return np.random.default_rng(np.random.SeedSequence([seed, int(stream), *keys]))


def derived_seed(seed: int, stream: Stream, *keys: int) -> int:
    """A 63-bit integer seed for libraries that want one (torch)."""
    state = np.random.SeedSequence([seed, int(stream), *keys]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])
