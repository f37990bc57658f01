"""Named data sets from tensorflow-datasets, read as random-access sources.

``tfds.data_source`` reads the ArrayRecord files of a prepared data set with no
TensorFlow at all. Preparing a data set the first time (download and convert)
does need TensorFlow and a network; ``open_source`` does it when it can, and
otherwise says exactly what to install or run.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from sngan_jax.data import folder

# Split used when the config leaves dataset.split empty. STL-10 trains on its
# 100,000 unlabelled images, as in the paper.
DEFAULT_SPLITS = {"stl10": "unlabelled"}
INSTALL_HINT = "pip install -e '.[tfds]'"


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes the short side of ``(H, W, C)`` uint8 to ``size``, center-crops.

    Square images of the right size pass through untouched; STL-10's 96 px
    become 48 px, ImageNet and CelebA get a square center crop.
    """
    h, w, c = image.shape
    if h == w == size:
        return image
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    return np.asarray(folder.fit_square(pil, size)).reshape(size, size, c)


class TfdsSource:
    """A split of a tfds data set, images fitted to ``image_size``.

    Reading and decoding (tfds stores PNG or JPEG bytes) runs at a few
    thousand images per second on one core, so a data set whose fitted images
    take at most ``preload_bytes`` is decoded once into memory up front
    (CIFAR-10: 150 MB, a few seconds) and then served from there.
    """

    def __init__(
        self,
        data_source: Any,
        image_size: int,
        num_classes: int,
        preload_bytes: float = 0,
    ):
        self.data_source = data_source
        self.image_size = image_size
        self.num_classes = num_classes
        self.arrays: dict[str, np.ndarray] | None = None
        if len(self) * image_size * image_size * 3 <= preload_bytes:
            self.arrays = self._decode_all()

    def __len__(self) -> int:
        return len(self.data_source)

    def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if self.arrays is not None:
            return {k: v[indices] for k, v in self.arrays.items()}
        return self._decode(indices)

    def _decode(self, indices: Any) -> dict[str, np.ndarray]:
        examples = _read(self.data_source, [int(i) for i in indices])
        images = np.stack([fit_image(_image(e), self.image_size) for e in examples])
        batch = {"images": images}
        if self.num_classes:
            batch["labels"] = np.array([e["label"] for e in examples], np.int32)
        return batch

    def _decode_all(self, chunk: int = 1024) -> dict[str, np.ndarray]:
        logging.info("decoding %d examples into memory", len(self))
        parts = [
            self._decode(range(i, min(i + chunk, len(self))))
            for i in range(0, len(self), chunk)
        ]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _read(data_source: Any, indices: list[int]) -> list[Mapping[str, Any]]:
    """Examples by index; one batched read where the source supports it."""
    try:
        return list(data_source.__getitems__(indices))
    except (AttributeError, TypeError):  # tfds's mock sources read one by one
        return [data_source[i] for i in indices]


def _image(example: Mapping[str, Any]) -> np.ndarray:
    image = np.asarray(example["image"])
    return image[..., None] if image.ndim == 2 else image


def open_source(dataset: Mapping[str, Any], image_size: int) -> TfdsSource:
    """The split named by ``config.dataset``, prepared first when needed."""
    import tensorflow_datasets as tfds

    name = dataset["name"]
    split = dataset["split"] or DEFAULT_SPLITS.get(name, "train")
    data_dir = dataset["data_dir"] or None
    builder = _builder(tfds, name, data_dir)
    if not _is_prepared(builder) and _has_tensorflow():
        _prepare(builder, name, data_dir)
    source = _data_source(tfds, name, split, data_dir)
    # STL-10's unlabelled split marks every label -1: it has no classes.
    num_classes = 0 if split == "unlabelled" else _num_classes(builder)
    preload = float(dataset["preload_max_gb"]) * 2**30
    return TfdsSource(source, image_size, num_classes, preload)


def _builder(tfds: Any, name: str, data_dir: str | None) -> Any:
    from sngan_jax.data import DataError

    try:
        return tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError:
        known = tfds.core.registered.list_imported_builders()
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise DataError(
            f"tensorflow-datasets knows no data set {name!r}{hint}"
        ) from None


def _data_source(tfds: Any, name: str, split: str, data_dir: str | None) -> Any:
    from sngan_jax.data import DataError

    where = data_dir or "~/tensorflow_datasets"
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir)
    except ImportError:
        # Only an unprepared data set reaches for TensorFlow, and it fails on
        # the import, before anything is written.
        raise DataError(
            f"data set {name!r} is not prepared in {where}. Preparing it once "
            f"needs TensorFlow and a network connection: run `{INSTALL_HINT}`, "
            f"then start training again (it prepares the data set by itself); "
            f"reading it afterwards needs neither"
        ) from None
    except (KeyError, ValueError) as e:
        raise DataError(
            f"cannot read split {split!r} of data set {name!r}: {e} "
            f"(set dataset.split to one of the data set's splits)"
        ) from None


def _is_prepared(builder: Any) -> bool:
    try:
        return builder.is_prepared()
    except Exception:  # a data dir tfds cannot read counts as not prepared
        return False


def _has_tensorflow() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _prepare(builder: Any, name: str, data_dir: str | None) -> None:
    from sngan_jax.data import DataError

    where = data_dir or "~/tensorflow_datasets"
    logging.warning("preparing %s in %s (once; this downloads it)", name, where)
    try:
        # tfds writes into a temporary directory and renames it when done, so
        # an interrupted preparation leaves no half-written data set behind.
        builder.download_and_prepare(file_format="array_record")
    except Exception as e:
        raise DataError(
            f"could not prepare data set {name!r} in {where}: {e}. It needs a "
            f"network connection (and, for imagenet2012, the manual download "
            f"that tensorflow-datasets documents for it)"
        ) from e


def _num_classes(builder: Any) -> int:
    features = builder.info.features
    if features is None or "label" not in features.keys():
        return 0
    return int(getattr(features["label"], "num_classes", 0) or 0)
