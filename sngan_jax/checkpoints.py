"""Saving and restoring runs with orbax-checkpoint.

A checkpoint holds three items: ``state`` (the whole ``TrainState`` as host
numpy arrays, so it restores onto any device count), ``data`` (the data
stream's position) and ``config`` (the run's config as JSON). They live in
``<workdir>/checkpoints/<step>/``.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config")


def checkpoint_dir(workdir: str, name: str = "checkpoints") -> str:
    return os.path.join(os.path.abspath(workdir), name)


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a workdir.

    ``name`` is the folder: ``checkpoints`` for the latest ones, ``best`` for
    the one with the best evaluation score.
    """

    def __init__(self, workdir: str, keep: int = 3, name: str = "checkpoints"):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(
            checkpoint_dir(workdir, name), options=options, item_names=ITEMS
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data: dict, config: dict) -> None:
        """Starts writing a checkpoint (asynchronously); ``state`` is on the host."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, template: Any = None) -> tuple[Any, dict, dict]:
        """``(state, data position, config dict)`` of checkpoint ``step``.

        With a ``template`` (a pytree of arrays with the right structure, such
        as a freshly initialized state on the host), the state comes back with
        that structure; without one, as nested dicts of numpy arrays.
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(template),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        restored = self.manager.restore(step, args=args)
        return restored.state, restored.data, restored.config

    def saved_config(self, step: int) -> dict:
        """The config stored with checkpoint ``step``, without reading the state."""
        args = ocp.args.Composite(config=ocp.args.JsonRestore())
        return self.manager.restore(step, args=args).config

    def wait(self) -> None:
        """Blocks until every started save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
