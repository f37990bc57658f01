"""Host-side input throughput: ``python -m sngan_jax.data.benchmark``.

Measures how many images per second a data stream delivers to the training
loop (shuffled global batches of uint8 images, as the loop draws them), for an
image folder and for a tensorflow-datasets source. Training never waits for
data when this is well above the step's images per second.

    python -m sngan_jax.data.benchmark --path=DIR [--image_size=32]
    python -m sngan_jax.data.benchmark --tfds=cifar10 [--data_dir=DIR]
    python -m sngan_jax.data.benchmark --tfds_dir=DIR/cifar10/3.0.2

``--tfds_dir`` reads a prepared data set straight from its directory (no
registered builder needed).
"""

from __future__ import annotations

import time

from absl import app, flags

from sngan_jax.data import folder, stream, tfds_source

FLAGS = flags.FLAGS
flags.DEFINE_string("path", None, "An image folder to benchmark.")
flags.DEFINE_string("tfds", None, "A tensorflow-datasets name to benchmark.")
flags.DEFINE_string("tfds_dir", None, "A prepared tfds data set directory.")
flags.DEFINE_string("data_dir", "", "tfds data directory.")
flags.DEFINE_string("split", "train", "tfds split.")
flags.DEFINE_integer("image_size", 32, "Images are fitted to this size.")
flags.DEFINE_integer("batch_size", 64, "Global batch size.")
flags.DEFINE_float("seconds", 5.0, "How long to draw batches for.")
flags.DEFINE_float("preload_max_gb", 4.0, "tfds: decode into memory up to this size.")


def images_per_second(source: stream.Source, batch_size: int, seconds: float) -> float:
    """Draws shuffled batches from ``source`` for ``seconds``; images per second."""
    batches = stream.ShuffledStream(source, batch_size, seed=0)
    next(batches)  # warm caches and lazy opens outside the clock
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(batches)["images"])
    return count / (time.perf_counter() - start)


def _folder_source(path: str, image_size: int) -> stream.Source:
    start = time.perf_counter()
    images, labels, classes = folder.load_image_folder(path, image_size)
    print(
        f"image folder: {len(images):,} images, {len(classes)} classes, loaded in "
        f"{time.perf_counter() - start:.2f} s (decoded once, then cached)"
    )
    return stream.ArraySource({"images": images, "labels": labels})


def _tfds_source() -> stream.Source:
    import tensorflow_datasets as tfds

    if FLAGS.tfds_dir:
        builder = tfds.builder_from_directory(FLAGS.tfds_dir)
        source = builder.as_data_source(split=FLAGS.split)
        preload = FLAGS.preload_max_gb * 2**30
        return tfds_source.TfdsSource(source, FLAGS.image_size, 10, preload)
    dataset = {
        "name": FLAGS.tfds,
        "split": FLAGS.split,
        "data_dir": FLAGS.data_dir,
        "preload_max_gb": FLAGS.preload_max_gb,
    }
    return tfds_source.open_source(dataset, FLAGS.image_size)


def main(argv: list[str]) -> None:
    del argv
    if not (FLAGS.path or FLAGS.tfds or FLAGS.tfds_dir):
        raise app.UsageError("give --path, --tfds or --tfds_dir")
    if FLAGS.path:
        source = _folder_source(FLAGS.path, FLAGS.image_size)
        rate = images_per_second(source, FLAGS.batch_size, FLAGS.seconds)
        print(f"image folder stream: {rate:,.0f} images/s")
    if FLAGS.tfds or FLAGS.tfds_dir:
        start = time.perf_counter()
        source = _tfds_source()
        print(f"tfds source opened in {time.perf_counter() - start:.2f} s")
        rate = images_per_second(source, FLAGS.batch_size, FLAGS.seconds)
        print(f"tfds stream ({len(source):,} examples): {rate:,.0f} images/s")


if __name__ == "__main__":
    app.run(main)
