"""A deterministic synthetic interaction dataset, the default when no data file is given.

Users drift between topics (clusters of items) and, within a topic, mostly continue a
chain (item i then i + 1) or pick a popular item of the topic (Zipf-skewed), so that the
next item is learnable from the history, as in real sessions, and a popularity baseline
is far from optimal.
"""

from __future__ import annotations

import numpy as np

from .readers import Interactions


def synthetic_interactions(
    num_users: int = 2000,
    num_items: int = 500,
    num_topics: int = 20,
    mean_length: float = 20.0,
    seed: int = 0,
) -> Interactions:
    rng = np.random.default_rng(seed)
    topic_size = num_items // num_topics
    zipf = 1.0 / np.arange(1, topic_size + 1) ** 1.1
    zipf /= zipf.sum()
    sequences = []
    for _ in range(num_users):
        length = max(3, int(rng.poisson(mean_length)))
        topic = int(rng.integers(num_topics))
        offset = int(rng.choice(topic_size, p=zipf))
        sequence = []
        for _ in range(length):
            if rng.random() < 0.1:  # interests drift to a neighbouring topic
                topic = (topic + int(rng.choice([-1, 1]))) % num_topics
                offset = int(rng.choice(topic_size, p=zipf))
            elif rng.random() < 0.7:  # continue the chain
                offset = (offset + 1) % topic_size
            else:  # a popular item of the topic
                offset = int(rng.choice(topic_size, p=zipf))
            sequence.append(1 + topic * topic_size + offset)
        sequences.append(sequence)
    return Interactions(
        sequences, num_topics * topic_size, f"synthetic(users={num_users}, items={num_items}, seed={seed})"
    )
