"""Evaluation protocols: how many samples, against which real images.

Scores from different protocols are not comparable. FID in particular falls
with the number of samples and depends on the reference split: the same model
scores far lower under "50k" (50,000 generated against the 50,000 training
images) than under the paper's "paper" (5,000 generated against 10,000 test
images). Every score this project writes carries its protocol.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What a set of scores was computed from.

    ``real_split`` empty means the data set's test split ("test"), or its
    training split for the "50k" protocol; a data set without that split
    names another with ``eval.real_split``.
    """

    name: str
    num_generated: int  # samples for FID, KID, IS and intra-FID
    num_real: int  # real images for the reference statistics (at most)
    real_split: str  # tfds split of the reference images
    is_splits: int = 10  # Inception Score parts
    kid_subsets: int = 100  # KID: number of random subsets
    kid_subset_size: int = 1000  # KID: vectors per subset and set
    seed: int = 0  # seeds the latents and labels of the generated samples

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROTOCOLS = {
    # The paper's: IS of 5,000 samples in 10 splits; FID of 5,000 generated
    # against 10,000 real test images.
    "paper": Protocol("paper", num_generated=5000, num_real=10000, real_split="test"),
    # The common one of later work: 50,000 generated against the training set.
    "50k": Protocol("50k", num_generated=50000, num_real=50000, real_split="train"),
}


def get(name: str, **overrides: Any) -> Protocol:
    """The named protocol; non-empty ``overrides`` (e.g. ``num_generated``) win.

    An overridden protocol gets ``+custom`` appended to its name, so that its
    scores are never mistaken for the named protocol's.
    """
    if name not in PROTOCOLS:
        raise ValueError(
            f"unknown protocol {name!r}; choose one of {sorted(PROTOCOLS)}"
        )
    protocol = PROTOCOLS[name]
    changed = {k: v for k, v in overrides.items() if v and v != getattr(protocol, k)}
    if not changed:
        return protocol
    return dataclasses.replace(protocol, name=f"{name}+custom", **changed)
