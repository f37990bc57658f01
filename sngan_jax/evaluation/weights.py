"""The published FID Inception weights: reading, checking and caching them.

Two files hold the same weights: pytorch-fid's PyTorch state dict (``.pth``,
the one downloaded here) and jax-fid's pickle of nested numpy dicts. Both are
pickles, and a pickle can run any code while it loads, so both are read by
``pickles`` with an unpickler that refuses every global except the few that
tensors and arrays need. PyTorch is never needed.

``load`` finds the weights (an explicit path, ``$SNGAN_JAX_INCEPTION_WEIGHTS``,
the cache, torch hub's cache, else a download), checks the source file's
sha256 against the published ones, and converts it once to an ``.npz`` in
``cache_dir("inception")`` that later runs read without any pickle.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sngan_jax import files
from sngan_jax.evaluation import cache_dir, inception, pickles

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

Params = dict[str, Any]


class InceptionWeightsError(RuntimeError):
    """The Inception weights are missing, corrupt, or do not fit the network."""


# Reading the two pickled formats (see ``pickles``).


def read_pth(path: str) -> dict[str, np.ndarray]:
    """Reads a PyTorch state dict (zip or legacy format) into numpy arrays.

    Returns a dict from tensor name to array, copied and contiguous, with the
    tensor's own dtype. Raises ``InceptionWeightsError`` on anything that is
    not a state dict of plain tensors.
    """
    try:
        return pickles.read_pth(path)
    except pickles.UnreadablePickle as e:
        raise InceptionWeightsError(f"cannot read {path}: {e}") from e
    except pickles.CORRUPT as e:
        raise InceptionWeightsError(
            f"cannot read {path} as a PyTorch state dict ({e!r}); the file may be "
            f"corrupt: delete it and download {PTH_URL} again."
        ) from e


def read_jax_fid_pickle(path: str) -> Any:
    """Reads jax-fid's pickle of nested dicts of numpy arrays, nothing else."""
    try:
        return pickles.read_numpy_pickle(path)
    except pickles.UnreadablePickle as e:
        raise InceptionWeightsError(f"cannot read {path}: {e}") from e
    except pickles.CORRUPT as e:
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
    try:
        files.save_npz(path, {**flat, SOURCE_KEY: np.array(source_sha256)})
    except OSError as e:
        logging.warning("Could not cache converted Inception weights: %s", e)


def _convert(path: str) -> Params:
    """Reads a .pth or a jax-fid pickle into params."""
    if zipfile.is_zipfile(path) or pickles.is_legacy_pth(path):
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
