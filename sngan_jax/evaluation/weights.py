"""The published FID Inception weights: reading, checking and caching them.

Two files hold the same weights: pytorch-fid's PyTorch state dict (``.pth``,
the one downloaded here) and jax-fid's pickle of nested numpy dicts. Both are
pickles, and a pickle can run any code while it loads, so both are read with
an unpickler that refuses every global except the few that tensors and arrays
need. PyTorch is never needed.

``load`` finds the weights (an explicit path, ``$SNGAN_JAX_INCEPTION_WEIGHTS``,
the cache, torch hub's cache, else a download), checks the source file's
sha256 against the published ones, and converts it once to an ``.npz`` in
``cache_dir("inception")`` that later runs read without any pickle.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import os
import pickle
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging

from sngan_jax.evaluation import cache_dir, inception

PTH_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
PTH_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
PTH_BYTES = 95_628_359
PICKLE_URL = (
    "https://www.dropbox.com/s/xt6zvlvt22dcwck/inception_v3_weights_fid.pickle?dl=1"
)
PICKLE_SHA256 = "4e030efa5bccac3222d975f658d1884f9e00fab24f2812082884539220b90d77"
KNOWN_SHA256 = {PTH_SHA256: "pytorch-fid .pth", PICKLE_SHA256: "jax-fid pickle"}

WEIGHTS_ENV = "SNGAN_JAX_INCEPTION_WEIGHTS"
# File names of the two sources, in our cache or in torch hub's.
PTH_NAME = "pt_inception-2015-12-05-6726825d.pth"
PICKLE_NAME = "inception_v3_weights_fid.pickle"
# Key of the converted .npz that records which source file it came from.
SOURCE_KEY = "__source_sha256__"
DOWNLOAD_TIMEOUT_S = 30.0

# First pickle of a legacy (pre-1.6) torch.save file, then its format version.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

Params = dict[str, Any]


class InceptionWeightsError(RuntimeError):
    """The Inception weights are missing, corrupt, or do not fit the network."""


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
            raise InceptionWeightsError(
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
        raise InceptionWeightsError(f"unexpected text encoding {encoding!r}")
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
        raise InceptionWeightsError(f"unsupported object in the state dict: {pid!r}")
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if not isinstance(storage_type, _StorageType):
        raise InceptionWeightsError(f"unsupported storage type {storage_type!r}")
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
        raise InceptionWeightsError(f"storage {storage.key} is truncated")
    if len(ref.shape) != len(ref.stride):
        raise InceptionWeightsError(
            f"tensor on {storage.key}: shape and strides differ"
        )
    if 0 in ref.shape:
        return np.zeros(ref.shape, flat.dtype)
    # Out-of-range strides would make as_strided read foreign memory.
    extent = sum((n - 1) * s for n, s in zip(ref.shape, ref.stride, strict=True))
    last = ref.offset + extent
    if ref.offset < 0 or min(ref.stride, default=0) < 0 or last >= flat.size:
        raise InceptionWeightsError(f"tensor exceeds its storage {storage.key}")
    strides = tuple(s * flat.itemsize for s in ref.stride)
    view = np.lib.stride_tricks.as_strided(
        flat[ref.offset :], ref.shape, strides, writeable=False
    )
    return np.array(view, dtype=flat.dtype.newbyteorder("="))


def _tensors(obj: Any, buffers: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of a loaded state dict, as numpy arrays."""
    if not isinstance(obj, Mapping):
        raise InceptionWeightsError(
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
            raise InceptionWeightsError(f"{path} is a zip but not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]
        if prefix + "byteorder" in archive.namelist():
            if archive.read(prefix + "byteorder").strip() != b"little":
                raise InceptionWeightsError(f"{path} is stored big-endian")
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
        raise InceptionWeightsError("not a torch.save file (no magic number)")
    if _load_pickle(file) != _LEGACY_PROTOCOL:
        raise InceptionWeightsError("unsupported legacy torch.save version")
    if not _load_pickle(file).get("little_endian", False):
        raise InceptionWeightsError("big-endian torch.save files are not supported")
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
            raise InceptionWeightsError(f"storage {key} is truncated")
        buffers[key] = np.frombuffer(data, dtype)
    return _tensors(obj, buffers)


def _is_legacy_pth(path: str) -> bool:
    """Whether ``path`` starts with the legacy torch.save magic number."""
    try:
        with open(path, "rb") as file:
            return _load_pickle(file) == _LEGACY_MAGIC
    except Exception:  # Any other pickle, or not a pickle at all.
        return False


def read_pth(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict (zip or legacy format) into numpy arrays.

    Returns a dict from tensor name to array, copied and contiguous, with the
    tensor's own dtype. Raises ``InceptionWeightsError`` on anything that is
    not a state dict of plain tensors.
    """
    try:
        if zipfile.is_zipfile(path):
            return _read_zip_pth(path)
        with open(path, "rb") as file:
            return _read_legacy_pth(file)
    except InceptionWeightsError as e:
        raise InceptionWeightsError(f"cannot read {path}: {e}") from e
    except (
        pickle.UnpicklingError,
        EOFError,
        LookupError,
        ValueError,
        TypeError,
        AttributeError,
    ) as e:
        raise InceptionWeightsError(
            f"cannot read {path} as a PyTorch state dict ({e!r}); the file may be "
            f"corrupt: delete it and download {PTH_URL} again."
        ) from e


def read_jax_fid_pickle(path: str) -> Any:
    """Reads jax-fid's pickle of nested dicts of numpy arrays, nothing else."""
    try:
        with open(path, "rb") as file:
            return _load_pickle(file, _numpy_globals())
    except InceptionWeightsError as e:
        raise InceptionWeightsError(f"cannot read {path}: {e}") from e
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise InceptionWeightsError(f"cannot read {path} as a pickle ({e!r})") from e


# Conversion to the Flax parameter tree.


@functools.lru_cache(maxsize=1)
def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Shape of every parameter of ``InceptionV3``, keyed by "a/b/c" path."""
    images = jax.ShapeDtypeStruct(
        (1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3), jnp.float32
    )
    variables = jax.eval_shape(inception.InceptionV3().init, jax.random.key(0), images)
    return {path: leaf.shape for path, leaf in _flatten(variables["params"])}


def _flatten(tree: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(path "a/b/c", leaf) pairs of a nested mapping, depth first."""
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from _flatten(value, path + "/")
        else:
            yield path, value


def _unflatten(flat: Mapping[str, Any]) -> Params:
    """The nested dict of {"a/b/c": leaf}."""
    tree: Params = {}
    for path, leaf in flat.items():
        *parents, name = path.split("/")
        node = tree
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = leaf
    return tree


def _check_shapes(
    flat: Mapping[str, np.ndarray], describe: Callable[[str], str]
) -> None:
    """Raises naming every missing, unexpected or mis-shaped parameter."""
    expected = expected_shapes()
    problems = [f"missing {describe(p)}" for p in expected if p not in flat]
    problems += [f"unexpected {describe(p)}" for p in flat if p not in expected]
    problems += [
        f"{describe(p)} has shape {flat[p].shape} after conversion, expected "
        f"{expected[p]}"
        for p in flat
        if p in expected and flat[p].shape != expected[p]
    ]
    if problems:
        shown = "; ".join(problems[:12])
        more = f"; and {len(problems) - 12} more" if len(problems) > 12 else ""
        raise InceptionWeightsError(
            f"the weights do not fit the FID Inception network: {shown}{more}"
        )


_TORCH_LEAVES = {"running_mean": "mean", "running_var": "var", "bias": "bias"}
_FLAX_LEAVES = {
    "kernel": "weight",
    "scale": "weight",
    "mean": "running_mean",
    "var": "running_var",
}


def _from_torch_leaf(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    """A torch parameter's Flax name and layout (kernels HWIO, dense (in, out))."""
    if name == "weight":
        if value.ndim == 4:
            return "kernel", value.transpose(2, 3, 1, 0)
        if value.ndim == 2:
            return "kernel", value.T
        return "scale", value
    return _TORCH_LEAVES.get(name, name), value


def _torch_key(path: str) -> str:
    """The torch state-dict key of a Flax path, for error messages."""
    *modules, leaf = path.split("/")
    return ".".join([*modules, _FLAX_LEAVES.get(leaf, leaf)])


def from_state_dict(sd: Mapping[str, np.ndarray]) -> Params:
    """pytorch-fid's state dict -> the ``InceptionV3`` params (float32 numpy).

    Raises ``InceptionWeightsError`` naming each missing, unexpected or
    mis-shaped key.
    """
    flat = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):  # A training counter.
            continue
        *modules, leaf = key.split(".")
        leaf, value = _from_torch_leaf(leaf, np.asarray(value))
        flat["/".join([*modules, leaf])] = np.ascontiguousarray(value, np.float32)
    _check_shapes(flat, _torch_key)
    return _unflatten(flat)


def from_jax_fid(obj: Mapping) -> Params:
    """jax-fid's nested dict of arrays -> the ``InceptionV3`` params.

    Its layout is already Flax's; the only difference is an optional conv
    ``bias``, which must be zero, since the network's convolutions have none.
    """
    if not isinstance(obj, Mapping):
        raise InceptionWeightsError(f"expected a nested dict, got {type(obj)}")
    flat = {}
    for path, value in _flatten(obj):
        value = np.asarray(value, np.float32)
        if path.endswith("/conv/bias"):
            if np.any(value != 0):
                raise InceptionWeightsError(f"{path} is not zero; this is not FID's")
            continue
        flat[path] = value
    _check_shapes(flat, lambda path: path)
    return _unflatten(flat)


# Finding, checking and caching files.


def sha256(path: str) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def converted_path(source_sha256: str) -> str:
    """Where the converted ``.npz`` of a source file with this hash lives."""
    return os.path.join(
        cache_dir("inception"), f"fid_inception_v3_{source_sha256[:12]}.npz"
    )


def _torch_hub_path() -> str:
    """Where torch hub (pytorch-fid) keeps the downloaded .pth."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "torch"
    )
    return os.path.join(os.path.expanduser(home), "hub", "checkpoints", PTH_NAME)


def _cached_source() -> str | None:
    """A source file that an earlier run or pytorch-fid already downloaded."""
    inception_cache = cache_dir("inception")
    for candidate in (
        os.path.join(inception_cache, PTH_NAME),
        os.path.join(inception_cache, PICKLE_NAME),
        _torch_hub_path(),
    ):
        if os.path.isfile(candidate):
            return candidate
    return None


def download(url: str, path: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Downloads ``url`` to ``path`` via a temporary file, so no half file stays."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".part")
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=timeout) as response,
        ):
            shutil.copyfileobj(response, out, 1 << 20)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _download_source(allowed: bool) -> str:
    """Downloads pytorch-fid's .pth into the cache, or explains what to do."""
    path = os.path.join(cache_dir("inception"), PTH_NAME)
    reason = "downloading is turned off"
    if allowed:
        logging.info("Downloading the FID Inception weights from %s", PTH_URL)
        try:
            download(PTH_URL, path)
            return path
        except (urllib.error.URLError, OSError) as e:
            reason = f"no network? {e}"
    raise InceptionWeightsError(
        f"Inception weights not found and could not be downloaded ({reason}). "
        f"Download {PTH_URL} ({PTH_BYTES / 1e6:.1f} MB) on a machine with network "
        f"access and put it at {path}, or pass --inception_weights=/path/to/file "
        f"(or set {WEIGHTS_ENV})."
    )


def _check_known(source_sha256: str, path: str) -> None:
    """Raises unless the hash is that of one of the published source files."""
    if source_sha256 in KNOWN_SHA256:
        return
    known = ", ".join(f"{sha} ({what})" for sha, what in KNOWN_SHA256.items())
    raise InceptionWeightsError(
        f"{path} comes from a file with sha256 {source_sha256}, but the FID "
        f"Inception weights have {known}. The file is corrupt or holds other "
        f"weights: delete it and download {PTH_URL} again, or pass "
        "--verify_weights=false (eval.verify_weights=False, or verify=False in "
        "Python) to use it knowingly; its scores are then not comparable to "
        "papers'."
    )


def read_converted(path: str) -> tuple[Params, str]:
    """Our converted weights and the sha256 of the file they came from."""
    try:
        with np.load(path, allow_pickle=False) as data:
            source = str(data[SOURCE_KEY])
            flat = {key: data[key] for key in data.files if key != SOURCE_KEY}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise InceptionWeightsError(
            f"cannot read converted weights {path} ({e!r}); delete it to convert "
            "the source file again."
        ) from e
    _check_shapes(flat, lambda p: p)
    return _unflatten(flat), source


def save_converted(path: str, params: Params, source_sha256: str) -> None:
    """Writes the converted weights atomically; a failure only costs speed."""
    flat = dict(_flatten(params))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.part")
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, **flat, **{SOURCE_KEY: np.array(source_sha256)})
        os.replace(tmp, path)
    except OSError as e:
        logging.warning("Could not cache converted Inception weights: %s", e)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _convert(path: str) -> Params:
    """Reads a .pth or a jax-fid pickle into params."""
    if zipfile.is_zipfile(path) or _is_legacy_pth(path):
        return from_state_dict(read_pth(path))
    return from_jax_fid(read_jax_fid_pickle(path))


def _is_npz(path: str) -> bool:
    """Whether ``path`` is our converted format (a zip of .npy files)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return f"{SOURCE_KEY}.npy" in archive.namelist()


def _load_file(path: str, verify: bool) -> tuple[Params, str]:
    """Params and source sha256 of a .pth, jax-fid pickle or converted .npz."""
    if not os.path.isfile(path):
        raise InceptionWeightsError(
            f"Inception weights file {path} does not exist. Download {PTH_URL} "
            f"and pass its path, or leave --inception_weights and {WEIGHTS_ENV} "
            "unset to use the cache."
        )
    if _is_npz(path):
        params, source = read_converted(path)
        if verify:
            _check_known(source, path)
        return params, source

    source = sha256(path)
    if verify:
        _check_known(source, path)
    cached = converted_path(source)
    if os.path.isfile(cached):
        params, cached_source = read_converted(cached)
        if cached_source == source:
            return params, source
    params = _convert(path)
    save_converted(cached, params, source)
    return params, source


def load(
    path: str | None = None, *, download: bool = True, verify: bool = True
) -> tuple[Params, str]:
    """The FID Inception params (numpy float32) and the source file's sha256.

    Looks in order at ``path`` (a .pth, a jax-fid .pickle or a converted .npz),
    ``$SNGAN_JAX_INCEPTION_WEIGHTS``, the converted cache, a source file in the
    cache or in torch hub's, and finally downloads pytorch-fid's .pth (when
    ``download``). With ``verify`` the source must be one of the published
    files; without, any weights of the right shapes load.
    """
    path = path or os.environ.get(WEIGHTS_ENV) or None
    if path is not None:
        return _load_file(os.path.expanduser(path), verify)
    for known in KNOWN_SHA256:
        if os.path.isfile(converted_path(known)):
            return _load_file(converted_path(known), verify)
    path = _cached_source() or _download_source(download)
    return _load_file(path, verify)
