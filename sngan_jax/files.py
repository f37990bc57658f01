"""Files written whole or not at all: caches, status and score records.

Each writer puts its data in a temporary file beside the target and renames
it over the target, so a reader (or a run killed mid-write) never sees half
a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

import numpy as np


def save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez(path, **arrays)``, atomically."""
    with _replacing(path, ".npz") as f:
        np.savez(f, **arrays)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON in ``path``, atomically."""
    with _replacing(path, ".json") as f:
        f.write((json.dumps(obj, indent=2) + "\n").encode())


@contextlib.contextmanager
def _replacing(path: str, suffix: str):
    fd, temp = tempfile.mkstemp(
        dir=os.path.dirname(path) or ".", prefix=".sngan_tmp_", suffix=suffix
    )
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        # mkstemp makes the file private; these files are as shareable as any.
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temp)
        raise
