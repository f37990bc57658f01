"""Images from a folder of files, decoded once and cached as one ``.npz`` array.

Layout: ``path/<class>/.../<image>`` gives labelled images, one class per
top-level folder (class names sorted, label = index in that list); images
directly in ``path`` with no class folders give unlabelled images (labels all
0, no class names). A top-level folder counts as a class when it holds at least
one file with a usual image extension; hidden files and folders (``.*``, such
as macOS's ``._x.jpg`` and this module's own caches) are never read.

Every file is decoded with Pillow, turned upright by its EXIF orientation,
converted to RGB or greyscale, resized so that its short side is
``image_size`` (bicubic, antialiased) and center-cropped to a square. Files
Pillow cannot read are skipped and named in one warning. The decoded arrays are
cached next to the data, keyed by a fingerprint of every file's relative path,
size and modification time, so a second run with an unchanged folder starts at
once and any added, removed or edited file triggers a fresh decode.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import os
import zipfile
from collections.abc import Iterator

import numpy as np
from absl import logging
from PIL import ExifTags, Image

from sngan_jax import files

# Only decides which top-level folders are classes; every file inside a class
# folder is handed to Pillow, which has the last word on what is an image.
IMAGE_EXTENSIONS = (
    ".bmp",
    ".gif",
    ".jpeg",
    ".jpg",
    ".pgm",
    ".png",
    ".ppm",
    ".tif",
    ".tiff",
    ".webp",
)
HOME_CACHE_DIR = os.path.join("~", ".cache", "sngan_jax")
# Part of the fingerprint: bump it when decoding changes, so that caches written
# by older code are not reused.
CACHE_VERSION = 1
_CACHE_KEYS = ("images", "labels", "class_names", "skipped")
_HELP = (
    "point dataset.path at a folder of .png/.jpg files, optionally in one "
    "folder per class"
)
# EXIF orientation tag value -> the transpose that turns the pixels upright.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def load_image_folder(
    path: str,
    image_size: int,
    channels: int = 3,
    cache_dir: str | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every image under ``path``, decoded, square and cached.

    Returns images uint8 ``(N, image_size, image_size, channels)``, labels int32
    ``(N,)`` and the sorted class names (``[]`` for a folder without class
    folders, whose labels are all 0). ``channels`` is 3 (RGB) or 1 (grey). The
    cache goes to ``cache_dir`` if given, else into ``path``, else (``path`` not
    writable) to ``~/.cache/sngan_jax``.
    """
    root = _checked_root(path, image_size, channels)
    files, class_names, ignored = list_files(root)
    if not files:
        raise _data_error(f"no images found under {root}; {_HELP}")

    name = cache_name(root, files, image_size, channels)
    cache_dirs = _cache_dirs(root, cache_dir)
    data = _read_cache(cache_dirs, name)
    if data is None:
        data = _decode_all(root, files, class_names, image_size, channels)
        if not len(data["images"]):
            examples = ", ".join(files[:3])
            raise _data_error(
                f"none of the {len(files)} files under {root} is an image Pillow "
                f"can read (e.g. {examples}); {_HELP}"
            )
        _write_cache(data, cache_dirs, name, root)

    class_names = [str(c) for c in data["class_names"]]
    skipped = [str(f) for f in data["skipped"]]
    _warn_unread(root, len(files), skipped, ignored, bool(class_names))
    return data["images"], data["labels"], class_names


def _data_error(message: str) -> ValueError:
    # Imported here: sngan_jax.data imports this module to build its streams.
    from sngan_jax.data import DataError

    return DataError(message)


def _checked_root(path: str, image_size: int, channels: int) -> str:
    """``path`` as an absolute folder; raises DataError with what to fix."""
    if channels not in (1, 3):
        raise _data_error(f"channels must be 1 (grey) or 3 (RGB), got {channels}")
    if image_size < 1:
        raise _data_error(f"the image size must be positive, got {image_size}")
    root = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(root):
        raise _data_error(f"dataset.path {root} does not exist; {_HELP}")
    if not os.path.isdir(root):
        raise _data_error(f"dataset.path {root} is a file, not a folder; {_HELP}")
    return root


def list_files(root: str) -> tuple[list[str], list[str], list[str]]:
    """Files to decode, class names and ignored files under the folder ``root``.

    Paths are relative to ``root``, joined with "/" and sorted, so the order of
    the images (and so of a seeded data stream) is the same on every machine.
    """
    found = sorted(_walk(root))
    nested = [f for f in found if "/" in f]
    folder_of = {f: f.split("/", 1)[0] for f in nested}
    class_names = sorted(
        {folder_of[f] for f in nested if f.lower().endswith(IMAGE_EXTENSIONS)}
    )
    if not class_names:
        return [f for f in found if "/" not in f], [], nested

    classes = set(class_names)
    files = [f for f in nested if folder_of[f] in classes]
    ignored = [f for f in found if folder_of.get(f) not in classes]
    return files, class_names, ignored


def _walk(root: str) -> Iterator[str]:
    """Relative paths of the non-hidden files below ``root``, in any order."""
    seen = set()  # real paths of visited folders: symlinks may form loops
    for folder, dirs, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        relative = os.path.relpath(folder, root).replace(os.sep, "/")
        for name in names:
            if not name.startswith(".") and os.path.isfile(os.path.join(folder, name)):
                yield name if relative == "." else f"{relative}/{name}"


def cache_name(root: str, files: list[str], image_size: int, channels: int) -> str:
    """The cache's file name: size, channels and a fingerprint of ``files``."""
    digest = hashlib.sha256(f"v{CACHE_VERSION} {image_size} {channels}".encode())
    for file in files:
        stat = os.stat(os.path.join(root, file))
        digest.update(f"\0{file}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
    return f".sngan_cache_{image_size}px_{channels}ch_{digest.hexdigest()[:16]}.npz"


def _cache_dirs(root: str, cache_dir: str | None) -> list[str]:
    """Where the cache may live, most preferred first."""
    first = os.path.abspath(os.path.expanduser(cache_dir)) if cache_dir else root
    home = os.path.expanduser(HOME_CACHE_DIR)
    return [first] if first == home else [first, home]


def _read_cache(cache_dirs: list[str], name: str) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when no readable cache of this name exists."""
    for directory in cache_dirs:
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            continue
        try:
            with np.load(file) as npz:
                data = {key: npz[key] for key in _CACHE_KEYS}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            logging.info("ignoring the unreadable cache %s (%s)", file, e)
            continue
        logging.info("read %d images from the cache %s", len(data["images"]), file)
        return data
    return None


def _write_cache(
    data: dict[str, np.ndarray], cache_dirs: list[str], name: str, root: str
) -> None:
    """Writes the cache into the first folder of ``cache_dirs`` that takes it."""
    errors = []
    for directory in cache_dirs:
        try:
            os.makedirs(directory, exist_ok=True)
            files.save_npz(os.path.join(directory, name), data)
        except OSError as e:
            errors.append(f"{directory}: {e.strerror or e}")
            continue
        if errors:
            logging.info("cannot cache in %s; cached in %s", errors[0], directory)
        if directory == root:
            _remove_stale_caches(root, name)
        return
    logging.warning(
        "could not write the image cache (%s); every run will decode the images "
        "again; set cache_dir to a writable folder",
        "; ".join(errors),
    )


def _remove_stale_caches(root: str, name: str) -> None:
    """Deletes caches in ``root`` for the same size whose fingerprint is old."""
    prefix = name.rsplit("_", 1)[0] + "_"
    for entry in os.listdir(root):
        if entry.startswith(prefix) and entry.endswith(".npz") and entry != name:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(root, entry))


def _decode_all(
    root: str, files: list[str], class_names: list[str], image_size: int, channels: int
) -> dict[str, np.ndarray]:
    """Decodes ``files`` on all cores; the arrays of the readable ones."""
    label_of = {name: i for i, name in enumerate(class_names)}
    images = np.empty((len(files), image_size, image_size, channels), np.uint8)
    labels, skipped = [], []
    decode = functools.partial(_try_decode, image_size=image_size, channels=channels)
    workers = os.cpu_count() or 1
    logging.info("decoding %d files under %s (%d threads)", len(files), root, workers)

    # Pillow releases the GIL while it decodes and resizes, so threads scale.
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        paths = [os.path.join(root, f) for f in files]
        for file, pixels in zip(files, pool.map(decode, paths), strict=True):
            if pixels is None:
                skipped.append(file)
                continue
            images[len(labels)] = pixels
            labels.append(label_of.get(file.split("/", 1)[0], 0))

    return {
        "images": images[: len(labels)],
        "labels": np.asarray(labels, np.int32),
        "class_names": np.asarray(class_names, dtype=str),
        "skipped": np.asarray(skipped, dtype=str),
    }


def _try_decode(path: str, image_size: int, channels: int) -> np.ndarray | None:
    """``decode(path)``, or None when Pillow cannot read the file."""
    try:
        return decode(path, image_size, channels)
    # Pillow's format plugins raise many kinds of errors on a malformed file
    # (OSError, SyntaxError, struct.error, ...); any of them means "skip it".
    except Exception:
        return None


def decode(path: str, image_size: int, channels: int) -> np.ndarray:
    """One image file as uint8 ``(image_size, image_size, channels)``."""
    with Image.open(path) as image:
        # JPEGs can decode at 1/2, 1/4 or 1/8 scale: far faster for big photos.
        image.draft(None, _short_side_to(image.size, image_size))
        image.load()
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        image = _convert(image, channels)
    image = fit_square(image, image_size)
    # Resizing and center-cropping commute with the EXIF transposes, so the
    # cheap place to turn the image upright is the small square at the end.
    if orientation in _UPRIGHT:
        image = image.transpose(_UPRIGHT[orientation])
    return np.asarray(image, np.uint8).reshape(image_size, image_size, channels)


def _convert(image: Image.Image, channels: int) -> Image.Image:
    """``image`` in mode RGB (3 channels) or L (1 channel), 8 bits a channel."""
    mode = "RGB" if channels == 3 else "L"
    if image.mode.startswith("I"):  # 16-bit ("I;16", "I;16B") or 32-bit grey
        image = _grey_to_8_bits(image)
    elif image.mode in ("P", "PA"):
        # Through RGBA, which keeps a palette's transparency without a warning.
        image = image.convert("RGBA")
    return image if image.mode == mode else image.convert(mode)


def _grey_to_8_bits(image: Image.Image) -> Image.Image:
    """Integer grey in 0..65535 scaled (rounded, not clipped) to 0..255."""
    pixels = np.asarray(image).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8))


def _short_side_to(size: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter one is ``image_size``."""
    scale = image_size / min(size)
    return tuple(max(image_size, round(s * scale)) for s in size)


def fit_square(image: Image.Image, image_size: int) -> Image.Image:
    """Short side resized to ``image_size``, then the central square cut out."""
    return _center_crop(_resize(image, image_size), image_size)


def _resize(image: Image.Image, image_size: int) -> Image.Image:
    """Bicubic resize to a short side of ``image_size`` pixels."""
    if min(image.size) == image_size:
        return image
    size = _short_side_to(image.size, image_size)
    # reducing_gap first shrinks by whole factors (box filter): fast, no aliasing.
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """The central ``image_size`` square of an image whose short side fits it."""
    width, height = image.size
    if width == height == image_size:
        return image
    left, top = (width - image_size) // 2, (height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def _warn_unread(
    root: str, total: int, skipped: list[str], ignored: list[str], by_class: bool
) -> None:
    """One warning line naming files that were skipped or ignored, if any."""
    parts = []
    if skipped:
        parts.append(
            f"skipped {len(skipped)} of {total} files that Pillow cannot read "
            f"({_examples(skipped)})"
        )
    if ignored:
        where = "outside the class folders" if by_class else "in folders without images"
        parts.append(f"ignored {len(ignored)} files {where} ({_examples(ignored)})")
    if parts:
        logging.warning("image folder %s: %s", root, "; ".join(parts))


def _examples(files: list[str]) -> str:
    more = f", and {len(files) - 3} more" if len(files) > 3 else ""
    return ", ".join(files[:3]) + more
