"""Reading pickled weights without running their code, and without PyTorch.

A pickle can call any importable function while it loads, so the files here
are read with an unpickler that resolves only the few globals that tensors
and numpy arrays need, and refuses everything else. Two formats:

- ``torch.save`` state dicts, both the zip format (torch >= 1.6) and the
  legacy one (a run of pickles followed by each storage's raw bytes);
- plain pickles of nested containers of numpy arrays.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

# First pickle of a legacy (pre-1.6) torch.save file, then its format version.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


# What a damaged (rather than refused) file raises while it is read.
CORRUPT = (
    pickle.UnpicklingError,
    EOFError,
    LookupError,
    ValueError,
    TypeError,
    AttributeError,
)


class UnreadablePickle(ValueError):
    """The file holds something other than tensors or arrays, or is malformed."""


# Restricted unpickling.


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals in ``allowed``."""

    def __init__(
        self,
        file: BinaryIO,
        allowed: Mapping[tuple[str, str], Any],
        persistent_load: Callable[[Any], Any] | None = None,
    ):
        super().__init__(file)
        self._allowed = allowed
        self._persistent_load = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._allowed:
            raise UnreadablePickle(
                f"refusing to load the global {module}.{name} from a weights "
                "pickle: only tensors and arrays are allowed, and anything else "
                "could run code. Is this really an Inception weights file?"
            )
        return self._allowed[module, name]

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise pickle.UnpicklingError("unexpected persistent id in a plain pickle")
        return self._persistent_load(pid)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """What pickled numpy arrays reference, under numpy 1 and numpy 2 names."""
    multiarray = np._core.multiarray
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Protocol 2 stores bytes as latin-1 text re-encoded on load.
        ("_codecs", "encode"): _latin1_encode,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[f"{package}.multiarray", "_reconstruct"] = multiarray._reconstruct
        allowed[f"{package}.multiarray", "scalar"] = multiarray.scalar
        allowed[f"{package}.numeric", "_frombuffer"] = np._core.numeric._frombuffer
    return allowed


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` limited to the one encoding that pickles use."""
    if encoding not in ("latin1", "latin-1"):
        raise UnreadablePickle(f"unexpected text encoding {encoding!r}")
    return text.encode("latin1")


def _load_pickle(
    file: BinaryIO,
    allowed: Mapping[tuple[str, str], Any] | None = None,
    persistent_load: Callable[[Any], Any] | None = None,
) -> Any:
    """One pickle from ``file``, resolving only ``allowed`` globals."""
    return _RestrictedUnpickler(file, allowed or {}, persistent_load).load()


# PyTorch state dicts without PyTorch.


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands in for a torch storage class: only its element type matters."""

    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A reference to ``numel`` elements at ``offset`` of the buffer ``key``."""

    key: str
    dtype: np.dtype
    numel: int
    offset: int = 0


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor as the pickle describes it, read once the buffers are loaded."""

    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    # Raw bytes; a tensor never sits directly on one in a state dict.
    "UntypedStorage": np.uint8,
}


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _TensorRef:
    """Stands in for ``torch._utils._rebuild_tensor(_v2)``."""
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad, backward_hooks) -> _TensorRef:
    """Stands in for ``torch._utils._rebuild_parameter``: the tensor alone."""
    return data


def _torch_globals() -> dict[tuple[str, str], Any]:
    """The globals a state dict of plain tensors references."""
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed["torch", name] = _StorageType(np.dtype(dtype).newbyteorder("<"))
    allowed["torch.storage", "UntypedStorage"] = allowed["torch", "UntypedStorage"]
    return allowed


def _storage_from_pid(pid: Any) -> _Storage:
    """Decodes ``('storage', type, key, location, numel[, view])``."""
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
        raise UnreadablePickle(f"unsupported object in the state dict: {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if not isinstance(storage_type, _StorageType):
        raise UnreadablePickle(f"unsupported storage type {storage_type!r}")
    view = pid[5] if len(pid) > 5 else None
    if view is None:
        return _Storage(key, storage_type.dtype, numel)
    # Files of old torch versions may point at a slice of another storage.
    _, view_offset, view_size = view
    return _Storage(key, storage_type.dtype, int(view_size), int(view_offset))


def _materialize(ref: _TensorRef, buffers: Mapping[str, np.ndarray]) -> np.ndarray:
    """Copies the tensor out of its buffer, honouring offset and strides."""
    storage = ref.storage
    flat = buffers[storage.key][storage.offset : storage.offset + storage.numel]
    if flat.size < storage.numel:
        raise UnreadablePickle(f"storage {storage.key} is truncated")
    if len(ref.shape) != len(ref.stride):
        raise UnreadablePickle(f"tensor on {storage.key}: shape and strides differ")
    if 0 in ref.shape:
        return np.zeros(ref.shape, flat.dtype)
    # Out-of-range strides would make as_strided read foreign memory.
    extent = sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    last = ref.offset + extent
    if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= flat.size:
        raise UnreadablePickle(f"tensor exceeds its storage {storage.key}")
    strides = tuple(s * flat.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :], ref.shape, strides, writeable=False
    )
    return np.array(view, dtype=flat.dtype.newbyteorder("="))


def _tensors(obj: Any, buffers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of a loaded state dict, as numpy arrays."""
    if not isinstance(obj, Mapping):
        raise UnreadablePickle(
            f"expected a state dict (a mapping of tensors), got {type(obj).__name__}"
        )
    return {
        str(name): _materialize(value, buffers)
        for name, value in obj.items()
        if isinstance(value, _TensorRef)
    }


def _read_zip_pth(path: str) -> dict[str, np.ndarray]:
    """The zip format of ``torch.save`` (torch >= 1.6)."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise UnreadablePickle(f"{path} is a zip but not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in archive.namelist():
            if archive.read(prefix + "byteorder").strip() != b"little":
                raise UnreadablePickle(f"{path} is stored big-endian")
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            storage = _storage_from_pid(pid)
            storages[storage.key] = storage
            return storage

        with archive.open(pickles[0]) as file:
            obj = _load_pickle(file, _torch_globals(), persistent_load)
        buffers = {
            key: np.frombuffer(archive.read(f"{prefix}data/{key}"), storage.dtype)
            for key, storage in storages.items()
        }
    return _tensors(obj, buffers)


def _read_legacy_pth(file: BinaryIO) -> dict[str, np.ndarray]:
    """The legacy format: a run of pickles, then each storage's raw bytes."""
    if _load_pickle(file) != _LEGACY_MAGIC:
        raise UnreadablePickle("not a torch.save file (no magic number)")
    if _load_pickle(file) != _LEGACY_PROTOCOL:
        raise UnreadablePickle("unsupported legacy torch.save version")
    if not _load_pickle(file).get("little_endian", False):
        raise UnreadablePickle("big-endian torch.save files are not supported")
    dtypes: dict[str, np.dtype] = {}

    def persistent_load(pid):
        storage = _storage_from_pid(pid)
        dtypes[storage.key] = storage.dtype
        return storage

    obj = _load_pickle(file, _torch_globals(), persistent_load)
    buffers = {}
    for key in _load_pickle(file):
        dtype = dtypes[key]
        count = int.from_bytes(file.read(8), "little")
        data = file.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise UnreadablePickle(f"storage {key} is truncated")
        buffers[key] = np.frombuffer(data, dtype)
    return _tensors(obj, buffers)


def is_legacy_pth(path: str) -> bool:
    """Whether ``path`` starts with the legacy torch.save magic number."""
    try:
        with open(path, "rb") as file:
            return _load_pickle(file) == _LEGACY_MAGIC
    except Exception:  # Any other pickle, or not a pickle at all.
        return False


def read_pth(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict (zip or legacy format) into numpy arrays.

    Returns a dict from tensor name to array, copied and contiguous, with the
    tensor's own dtype. Raises ``UnreadablePickle`` for anything that is not a
    state dict of plain tensors, and one of ``CORRUPT`` for a damaged file.
    """
    if zipfile.is_zipfile(path):
        return _read_zip_pth(path)
    with open(path, "rb") as file:
        return _read_legacy_pth(file)


def read_numpy_pickle(path: str) -> Any:
    """Reads a pickle of nested containers of numpy arrays, nothing else."""
    with open(path, "rb") as file:
        return _load_pickle(file, _numpy_globals())
