"""The image-folder loader on synthetic folders and on real CIFAR-10 JPEGs."""

import io
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sngan_jax import files
from sngan_jax.data import DataError, folder

CIFAR_ARCHIVE = Path(__file__).resolve().parents[2] / "shared/data/cifar10_jpeg.tar.gz"
CIFAR_CLASSES = sorted(
    "airplane automobile bird cat deer dog frog horse ship truck".split()
)


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (8, 8)):
    return Image.new("RGB", size, colour)


def corrupt_jpeg(path: Path) -> Path:
    """A JPEG cut off after half its bytes: Pillow raises on decoding it."""
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_class_folders_give_sorted_classes_and_labels(tmp_path):
    colours = {"dog": (0, 0, 255), "cat": (255, 0, 0)}
    for name, count in (("dog", 3), ("cat", 2)):
        for i in range(count):
            save(tmp_path / name / f"{i}.png", solid(colours[name]))
    save(tmp_path / "cat" / "nested" / "deep.png", solid(colours["cat"]))

    images, labels, class_names = folder.load_image_folder(str(tmp_path), 8)

    assert class_names == ["cat", "dog"]
    np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    for image, label in zip(images, labels, strict=True):
        np.testing.assert_array_equal(image[4, 4], colours[class_names[label]])


def test_flat_folder_has_no_classes(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", solid((i, i, i)))

    images, labels, class_names = folder.load_image_folder(tmp_path, 8)

    assert class_names == []
    np.testing.assert_array_equal(labels, [0, 0, 0])
    np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 1, 2])  # sorted order


def test_files_beside_class_folders_are_ignored_with_a_warning(tmp_path, caplog):
    save(tmp_path / "a" / "0.png", solid((1, 2, 3)))
    save(tmp_path / "stray.png", solid((4, 5, 6)))

    images, labels, class_names = folder.load_image_folder(tmp_path, 8)

    assert class_names == ["a"] and len(images) == 1
    (warning,) = warnings_of(caplog)
    assert "ignored 1 files outside the class folders (stray.png)" in warning


# Pillow warns when a palette image with transparency goes straight to RGB.
@pytest.mark.filterwarnings("error::UserWarning")
def test_modes_are_converted_to_rgb(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 128))
    grey = Image.new("L", (8, 8), 77)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.info["transparency"] = bytes([128, 255])  # index 0 half transparent
    # 16-bit grey: 32896 / 65535 is exactly half-way, 1000 would clip to 255.
    deep = np.full((8, 8), 32896, np.uint16)
    deep[0, 0] = 1000
    deep_image = Image.fromarray(deep)
    assert deep_image.mode == "I;16"
    for name, image in (("a", rgba), ("b", grey), ("c", palette), ("d", deep_image)):
        save(tmp_path / f"{name}.png", image)
    with Image.open(tmp_path / "d.png") as reread:
        assert reread.mode == "I;16"  # a real 16-bit file

    images, _, _ = folder.load_image_folder(tmp_path, 8)

    np.testing.assert_array_equal(images[0, 3, 3], (10, 20, 30))
    np.testing.assert_array_equal(images[1, 3, 3], (77, 77, 77))
    np.testing.assert_array_equal(images[2, 3, 3], (200, 100, 50))
    np.testing.assert_array_equal(images[3, 3, 3], (128, 128, 128))
    np.testing.assert_array_equal(images[3, 0, 0], (4, 4, 4))  # round(1000/257)


def test_one_channel(tmp_path):
    save(tmp_path / "a.png", solid((255, 255, 255), (12, 12)))
    save(tmp_path / "b.png", Image.new("I;16", (12, 12), 65535))

    images, _, _ = folder.load_image_folder(tmp_path, 6, channels=1)

    assert images.shape == (2, 6, 6, 1)
    np.testing.assert_array_equal(images, 255)


def test_short_side_is_resized_then_center_cropped(tmp_path):
    # 80 x 20: red | green | blue columns, and a black band on the top 4 rows.
    pixels = np.zeros((20, 80, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    pixels[:, 20:60] = (0, 255, 0)
    pixels[:, 60:] = (0, 0, 255)
    pixels[:4] = 0
    save(tmp_path / "wide.png", Image.fromarray(pixels))
    save(tmp_path / "tall.png", Image.fromarray(pixels.transpose(1, 0, 2).copy()))

    images, _, _ = folder.load_image_folder(tmp_path, 10)

    tall, wide = images  # sorted file names
    np.testing.assert_array_equal(tall, wide.transpose(1, 0, 2))
    # The 20 rows shrink to 10 (the band to 2 rows): a crop without resizing
    # would miss the band; squashing the whole width would show red and blue.
    assert wide[:2].max() < 60
    body = wide[3:].astype(int)
    assert (body[..., 1] > 240).all() and (body[..., [0, 2]] < 15).all()


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[:, :4] = (255, 0, 0)  # red left half, as stored
    exif = Image.Exif()
    exif[0x0112] = 3  # "rotate 180 degrees to display"
    save(tmp_path / "a.png", Image.fromarray(pixels), exif=exif)

    images, _, _ = folder.load_image_folder(tmp_path, 8)

    np.testing.assert_array_equal(images[0, 4, 6], (255, 0, 0))
    np.testing.assert_array_equal(images[0, 4, 1], (0, 0, 0))


def test_unreadable_files_are_skipped_with_one_warning(tmp_path, caplog):
    save(tmp_path / "a.png", solid((1, 1, 1)))
    save(tmp_path / "b.jpg", solid((2, 2, 2)))
    (tmp_path / "notes.txt").write_text("not an image")
    corrupt_jpeg(tmp_path / "broken.jpg")
    (tmp_path / ".DS_Store").write_bytes(b"\0hidden")

    images, _, _ = folder.load_image_folder(tmp_path, 8)

    assert len(images) == 2
    (warning,) = warnings_of(caplog)
    assert "skipped 2 of 4 files" in warning
    assert "broken.jpg, notes.txt" in warning and "DS_Store" not in warning


def test_missing_empty_and_unreadable_folders_raise(tmp_path):
    with pytest.raises(DataError, match="does not exist; point dataset.path at"):
        folder.load_image_folder(str(tmp_path / "nowhere"), 8)
    with pytest.raises(DataError, match="no images found under .*one folder per"):
        folder.load_image_folder(str(tmp_path), 8)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"none of the 1 files .*e\.g\. notes\.txt"):
        folder.load_image_folder(str(tmp_path), 8)
    with pytest.raises(DataError, match="is a file, not a folder"):
        folder.load_image_folder(str(tmp_path / "notes.txt"), 8)
    with pytest.raises(DataError, match="channels must be 1"):
        folder.load_image_folder(str(tmp_path), 8, channels=4)


def cache_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob(".sngan_cache_*"))


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for i in range(3):
        save(data / "c" / f"{i}.png", solid((i, 0, 0)))
    first = folder.load_image_folder(data, 8)
    (name,) = cache_files(data)
    assert name.startswith(".sngan_cache_8px_3ch_") and name.endswith(".npz")

    real_decode = folder.decode
    calls = []
    monkeypatch.setattr(folder, "decode", lambda *a: calls.append(a) or 1 / 0)
    second = folder.load_image_folder(data, 8)
    assert calls == []
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)

    monkeypatch.setattr(folder, "decode", lambda *a: calls.append(a) or real_decode(*a))
    save(data / "c" / "3.png", solid((3, 0, 0)))
    images, _, _ = folder.load_image_folder(data, 8)
    assert len(calls) == 4 and len(images) == 4
    (new_name,) = cache_files(data)  # the stale cache is gone
    assert new_name != name


def test_cache_dir_and_fallback_when_folder_is_read_only(tmp_path, monkeypatch):
    data = tmp_path / "data"
    save(data / "a.png", solid((9, 9, 9)))
    elsewhere = tmp_path / "caches"
    folder.load_image_folder(data, 8, cache_dir=str(elsewhere))
    assert cache_files(data) == [] and len(cache_files(elsewhere)) == 1

    # Root ignores file permissions, so refuse writes into the data folder here.
    mkstemp = files.tempfile.mkstemp

    def refuse_data_folder(dir, **kwargs):
        if Path(dir) == data:
            raise PermissionError(13, "Permission denied")
        return mkstemp(dir=dir, **kwargs)

    home = tmp_path / "home_cache"
    monkeypatch.setattr(files.tempfile, "mkstemp", refuse_data_folder)
    monkeypatch.setattr(folder, "HOME_CACHE_DIR", str(home))
    images, _, _ = folder.load_image_folder(data, 8)
    assert len(images) == 1
    assert cache_files(data) == [] and len(cache_files(home)) == 1
    assert not list(data.glob(".sngan_tmp_*"))


def test_real_cifar10_jpegs(tmp_path, caplog):
    if not CIFAR_ARCHIVE.exists():
        pytest.skip(
            f"{CIFAR_ARCHIVE} not found: the real CIFAR-10 JPEGs live in the "
            "shared folder beside the repository (see ../shared/data/README.md)"
        )
    per_class = 30
    counts = dict.fromkeys(CIFAR_CLASSES, 0)
    with tarfile.open(CIFAR_ARCHIVE) as archive:
        for member in archive:
            parts = member.name.split("/")
            if member.isfile() and parts[0] == "train" and counts[parts[1]] < per_class:
                counts[parts[1]] += 1
                archive.extract(member, tmp_path, filter="data")
            if min(counts.values()) == per_class:
                break
    train = tmp_path / "train"
    corrupt_jpeg(train / "cat" / "zz_broken.jpg")
    (train / "dog" / "labels.txt").write_text("not an image")

    images, labels, class_names = folder.load_image_folder(str(train), 32)

    assert class_names == CIFAR_CLASSES
    assert images.shape == (10 * per_class, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [per_class] * 10)
    assert 60 < images.mean() < 200 and images.std() > 30  # photographs, not blank
    (warning,) = warnings_of(caplog)
    assert "skipped 2 of 302 files" in warning
    assert "cat/zz_broken.jpg" in warning and "dog/labels.txt" in warning
    assert len(cache_files(train)) == 1
