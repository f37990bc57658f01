"""The benchmark's peers: other programs of the same network, run side by side.

A peer takes ``batch iterations n_dis [--no-sn]`` on its command line and
prints ``s/iter=<seconds>``, as the PyTorch and stock Flax programs of the
paper's standard CNN in ``../shared/bench`` do.
"""

from __future__ import annotations

import re
import subprocess
from typing import NamedTuple


class Peer(NamedTuple):
    """A peer program's seconds per iteration, the median over rounds."""

    name: str
    variant: str
    step_s: float | None
    round_step_s: list[float]
    detail: str  # its last output line, or why it failed


def peer_args(config, variant: str, steps: int) -> list[str] | None:
    """The peers' arguments for ``variant``; None where they have no counterpart.

    The peers implement only the paper's standard CNN with spectral
    normalization on or off, with the hinge loss.
    """
    if variant not in ("config", "none") or config.model.name != "sndcgan":
        return None
    if variant == "config" and config.model.d_norm not in ("spectral", "none"):
        return None
    args = [str(config.batch_size), str(steps), str(config.n_dis)]
    if variant == "none" or config.model.d_norm == "none":
        args.append("--no-sn")
    return args


def run_peer(command: list[str]) -> tuple[float | None, str]:
    """Runs a peer once: (its seconds per iteration or None, its last line)."""
    done = subprocess.run(command, capture_output=True, text=True)
    match = re.search(r"s/iter=([0-9.]+)", done.stdout)
    lines = (done.stdout if match else done.stderr or done.stdout).strip()
    last = lines.splitlines()[-1] if lines else ""
    if done.returncode or not match:
        return None, f"failed: {last}"
    return float(match.group(1)), last
