"""Saving and restoring runs with orbax-checkpoint.

A checkpoint holds four items: ``state`` (the whole ``TrainState`` as host
numpy arrays, so it restores onto any device count), ``data`` (the data
stream's position), ``config`` (the run's config as JSON) and ``checksum``
(the sha256 of the state's arrays). They live in
``<workdir>/checkpoints/<step>/``.

Orbax writes a checkpoint into ``<step>.orbax-checkpoint-tmp`` and renames it
to ``<step>`` once every file is written, so a save cut short (a killed
process, a full disk) leaves the checkpoints before it as they were; such an
unfinished folder is reported and ignored. A checkpoint damaged after it was
written (a truncated, overwritten or missing file) is found when it fails to
read back or its arrays no longer match their checksum (tensorstore does not
notice every overwritten byte by itself): it is reported, moved to
``<workdir>/unreadable_checkpoints/`` (never deleted) and the one before it is
used.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import tempfile
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from sngan_jax import train, writers

ITEMS = ("state", "data", "config", "checksum")
UNREADABLE = "unreadable_checkpoints"  # beside checkpoints/, for damaged ones
UNFINISHED = ".orbax-checkpoint-tmp"  # orbax's mark on a save still in progress
CLOSED_LOOP = "Event loop is closed"


class CheckpointError(Exception):
    """The workdir cannot be written, or a checkpoint could not be saved."""


class CorruptCheckpoint(Exception):
    """A checkpoint read back, but its contents are not what was saved."""


def state_digest(state: Any) -> str:
    """Hex sha256 over every array of ``state`` (dtype, shape and bytes), in order."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        array = np.ascontiguousarray(leaf)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _check_shapes(state: Any, template: Any) -> None:
    """Raises ``ValueError`` naming the first array whose shape or dtype differs.

    Orbax restores numpy arrays with the shapes they were saved with, whatever
    the template says; a wider model would only fail later, inside flax.
    """
    saved = jax.tree_util.tree_flatten_with_path(state)[0]
    for (path, a), b in zip(saved, jax.tree.leaves(template), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"{jax.tree_util.keystr(path)} is {a.dtype}{list(a.shape)} in the "
                f"checkpoint and {b.dtype}{list(b.shape)} in this config's model"
            )


def checkpoint_dir(workdir: str, name: str = "checkpoints") -> str:
    return os.path.join(os.path.abspath(workdir), name)


def check_writable(workdir: str) -> None:
    """Raises ``CheckpointError`` unless files can be created in ``workdir``.

    Creates the workdir when it does not exist. Writing a probe file is the
    only test that also holds for root (who ignores permissions), read-only
    mounts and full disks.
    """
    try:
        os.makedirs(workdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=workdir, prefix=".sngan_write_test_")
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise CheckpointError(
            f"cannot write to the workdir {workdir}: {e.strerror} "
            f"({e.filename}); pick another --workdir, or fix its permissions or "
            f"free space"
        ) from None


class Checkpointer:
    """Keeps the last ``keep`` checkpoints of a workdir.

    ``name`` is the folder: ``checkpoints`` for the latest ones, ``best`` for
    the one with the best evaluation score.
    """

    def __init__(self, workdir: str, keep: int = 3, name: str = "checkpoints"):
        _quiet_closed_loop()
        self.directory = checkpoint_dir(workdir, name)
        self.name = name
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=ITEMS
        )
        self._saving: int | None = None  # the step of the save in flight
        self._reported = False  # unfinished saves are reported once

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: Any, data: dict, config: dict) -> None:
        """Starts writing a checkpoint (asynchronously); ``state`` is on the host.

        Raises ``CheckpointError`` when the previous save failed (its error
        surfaces here) or this one cannot start.
        """
        # Orbax waits for the previous save before starting one; waiting here
        # first costs nothing more and names the step that failed.
        self.wait()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config),
            checksum=ocp.args.JsonSave({"sha256": state_digest(state)}),
        )
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:
            raise self._save_error(step, e) from e
        self._saving = step

    def wait(self) -> None:
        """Blocks until every started save is written; ``CheckpointError`` if not."""
        step, self._saving = self._saving, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(step, e) from e

    def _save_error(self, step: int | None, error: Exception) -> CheckpointError:
        return self.write_error(_reason(error), step)

    def write_error(self, reason: str, step: int | None = None) -> CheckpointError:
        """The error for a failed write: what failed, and which checkpoint is intact.

        ``step``: the checkpoint whose save failed; None when the failed write
        was another file of the workdir.
        """
        self.manager.reload()
        intact = [s for s in self.all_steps() if s != step]
        kept = (
            f"the checkpoint at step {intact[-1]} is intact; run the same command "
            f"to resume from it"
            if intact
            else "no earlier checkpoint exists"
        )
        what = (
            f"the checkpoint of step {step} in {self.directory}"
            if step is not None
            else f"to the workdir {os.path.dirname(self.directory)}"
        )
        return CheckpointError(
            f"could not write {what}: {reason}. Free disk space or fix the file "
            f"system; {kept}"
        )

    def restore(self, step: int, template: Any = None) -> tuple[Any, dict, dict]:
        """``(state, data position, config dict)`` of checkpoint ``step``.

        With a ``template`` (a pytree of arrays with the right structure, such
        as a freshly initialized state on the host), the state comes back with
        that structure, checked against the checksum saved with it (a
        ``CorruptCheckpoint`` error on a mismatch); without one, as nested dicts
        of numpy arrays, unchecked.
        """
        items = dict(
            state=ocp.args.StandardRestore(template),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        checked = template is not None and self._has_item(step, "checksum")
        if checked:
            items["checksum"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if checked and state_digest(restored.state) != restored.checksum["sha256"]:
            raise CorruptCheckpoint(
                "its arrays do not match the sha256 saved with them"
            )
        return restored.state, restored.data, restored.config

    def _has_item(self, step: int, item: str) -> bool:
        # Checkpoints written before checksums were added have no such item.
        return os.path.isdir(os.path.join(self.directory, str(step), item))

    def saved_config(self, step: int) -> dict:
        """The config stored with checkpoint ``step``, without reading the state."""
        args = ocp.args.Composite(config=ocp.args.JsonRestore())
        return self.manager.restore(step, args=args).config

    def latest_config(self) -> tuple[int, dict] | None:
        """``(step, config)`` of the newest checkpoint whose config reads back.

        Unreadable checkpoints on the way are set aside (see ``restore_latest``).
        """
        self._report_unfinished()
        for step in reversed(self.all_steps()):
            try:
                return step, self.saved_config(step)
            except Exception as e:
                self._set_aside(step, e)
        return None

    def restore_latest(self, template: Any) -> tuple[int, Any, dict, dict] | None:
        """``(step, state, data, config)`` of the newest checkpoint that reads back.

        A checkpoint that fails to read is reported in one warning line, moved
        to ``<workdir>/unreadable_checkpoints/`` and the one before it is
        tried. One that reads without the template but not with it is whole
        and of another structure (a changed model): that error is raised.
        None when there is no readable checkpoint.
        """
        self._report_unfinished()
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(step, template)
                _check_shapes(restored[0], template)
                return step, *restored
            except Exception as e:
                if not isinstance(e, CorruptCheckpoint) and self._readable(step):
                    raise CheckpointError(
                        f"the checkpoint of step {step} in {self.directory} holds "
                        f"a train state of another structure (the model or "
                        f"optimizer changed: {_reason(e)}); such a change cannot "
                        f"resume, pick another --workdir"
                    ) from e
                self._set_aside(step, e)
        return None

    def _readable(self, step: int) -> bool:
        try:
            self.restore(step)
        except Exception:
            return False
        return True

    def _set_aside(self, step: int, error: Exception) -> None:
        source = os.path.join(self.directory, str(step))
        target = os.path.join(os.path.dirname(self.directory), UNREADABLE, self.name)
        target = _unused(os.path.join(target, str(step)))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        writers.console(
            f"warning: the checkpoint of step {step} is unreadable ({_reason(error)});"
            f" moved to {target}, using an earlier one"
        )

    def _report_unfinished(self) -> None:
        if self._reported:
            return
        self._reported = True
        names = sorted(n for n in os.listdir(self.directory) if UNFINISHED in n)
        if names:
            writers.console(
                f"warning: ignoring {len(names)} unfinished checkpoint save(s) in "
                f"{self.directory} ({', '.join(names)}), left by a run stopped "
                f"while saving; they can be deleted"
            )

    def close(self) -> None:
        self.manager.close()


def _quiet_closed_loop() -> None:
    """Drops the "Event loop is closed" echoes of a failed orbax read or write.

    When tensorstore fails to read a damaged file (or to write to a full
    disk), the callbacks of the operations still in flight land on an asyncio
    loop that orbax has closed, and each prints a traceback as an "unraisable"
    exception, dozens at a time. The error itself is raised and reported; only
    these echoes are dropped. Installed once per process; every other
    unraisable exception goes to the previous hook.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_echoes", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == CLOSED_LOOP):
            previous(unraisable)

    hook.drops_closed_loop_echoes = True
    sys.unraisablehook = hook


def _unused(path: str) -> str:
    """``path``, or ``path-2``, ``path-3``, ... when it is taken."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def _reason(error: Exception) -> str:
    """One line about an orbax or file-system error, with the OS's words first."""
    text = " ".join(str(error).split()) or type(error).__name__
    # Tensorstore reports an OS error as a number at the end of a long message.
    code = re.search(r"os_error_code='?(\d+)", text)
    if len(text) > 300:
        text = text[:200] + " ... " + text[-95:]
    if code:
        text = f"{os.strerror(int(code.group(1)))}: {text}"
    return f"{type(error).__name__}: {text}"


def save_replicated(config, ckpt, state, stream) -> None:
    """Starts saving the (replicated) state and the stream's position."""
    host_state = train.unreplicate(state)
    step = int(host_state.step)
    ckpt.save(step, host_state, stream.get_state(), config.to_dict())
