"""Data sources and streams: tfds (mocked), fitting, resumption, process slices."""

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import cifar10_sndcgan, common
from sngan_jax import data, loop
from sngan_jax.data import stream as streams
from sngan_jax.data import tfds_source


def tfds_dataset(name, **fields):
    dataset = common.base().dataset
    dataset.name = name
    dataset.update(fields)
    return dataset


def tiny_cifar_config(steps):
    """The standard CNN config at width 4, batch 8, logging every step."""
    config = cifar10_sndcgan.get_config("C")
    config.model.ch = 4
    config.batch_size = 8
    config.total_steps = steps
    config.log_every = 1
    config.sample_every = steps
    config.checkpoint_every = steps
    return config


@pytest.mark.parametrize(
    "name,size,classes",
    [("cifar10", 32, 10), ("stl10", 48, 0), ("imagenet2012", 128, 1000)],
)
def test_tfds_sources_through_mock_data(name, size, classes):
    with tfds.testing.mock_data(num_examples=40):
        stream, info = data.create(tfds_dataset(name), 8, seed=0, image_size=size)
        batch = next(stream)
    assert info == data.DataInfo("images", (size, size, 3), classes)
    assert batch["images"].shape == (8, size, size, 3)
    assert batch["images"].dtype == np.uint8
    if classes:
        assert batch["labels"].dtype == np.int32
        assert np.all((batch["labels"] >= 0) & (batch["labels"] < classes))
    else:  # STL-10's unlabelled split has no classes
        assert "labels" not in batch


def test_a_few_training_steps_on_mock_cifar10(tmp_path):
    config = tiny_cifar_config(2)
    config.dataset.random_flip = True
    with tfds.testing.mock_data(num_examples=16):
        state = loop.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 2
    assert (tmp_path / "samples" / "step_0000002.png").exists()


def test_unknown_tfds_name_suggests_close_matches():
    with pytest.raises(data.DataError, match="did you mean.*cifar10"):
        data.create(tfds_dataset("cifar01"), 8, seed=0, image_size=32)


def test_fit_image_resizes_the_short_side_and_crops_the_centre():
    image = np.zeros((60, 100, 3), np.uint8)
    image[:, 20:80] = 255  # a white centre band 60 px wide: the central square
    out = tfds_source.fit_image(image, 30)
    assert out.shape == (30, 30, 3)
    assert out[5:25, 5:25].min() > 240
    stl = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    assert tfds_source.fit_image(stl, 48).shape == (48, 48, 3)
    assert tfds_source.fit_image(stl, 96) is stl


def array_stream(size, batch, seed=3, **where):
    source = streams.ArraySource({"images": np.arange(size)})
    return streams.ShuffledStream(source, batch, seed, **where)


def test_resumed_stream_continues_the_same_sequence():
    straight = array_stream(50, 8)
    expected = [next(straight)["images"] for _ in range(20)]
    first = array_stream(50, 8)
    seen = [next(first)["images"] for _ in range(7)]
    resumed = array_stream(50, 8)
    resumed.set_state(first.get_state())
    seen += [next(resumed)["images"] for _ in range(13)]
    for a, b in zip(seen, expected, strict=True):
        assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="same seed"):
        array_stream(50, 8, seed=4).set_state(first.get_state())


def test_processes_read_disjoint_slices_that_cover_each_epoch():
    size, batch = 48, 12  # four global batches per epoch
    whole = array_stream(size, batch)
    parts = [
        array_stream(size, batch, process_index=i, process_count=3) for i in range(3)
    ]
    for _ in range(8):  # two epochs
        global_rows = next(whole)["images"]
        rows = [next(p)["images"] for p in parts]
        assert all(len(r) == batch // 3 for r in rows)
        assert np.array_equal(np.concatenate(rows), global_rows)
    epoch = np.concatenate(
        [
            array_stream(size, batch).source.get_batch(
                array_stream(size, batch).indices(b)
            )["images"]
            for b in range(4)
        ]
    )
    assert sorted(epoch.tolist()) == list(range(size))


def test_random_flip_mirrors_only_the_chosen_images():
    images = jnp.arange(2 * 1 * 3 * 1).reshape(2, 1, 3, 1)
    out = data.random_flip(images, jnp.array([True, False]))
    assert out[0, 0, :, 0].tolist() == [2, 1, 0]
    assert out[1, 0, :, 0].tolist() == [3, 4, 5]


def test_a_few_training_steps_on_an_image_folder(cifar_jpeg_folder, tmp_path, caplog):
    config = tiny_cifar_config(2)
    config.dataset.name = "image_folder"
    config.dataset.path = str(cifar_jpeg_folder)
    config.dataset.cache_dir = str(tmp_path / "cache")
    state = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert int(state.step) == 2
    assert any("skipped 2 of 202 files" in r.getMessage() for r in caplog.records)
    # Conditional models see the class folders as labels.
    _, info = data.create(config.dataset, 8, 0, image_size=32)
    assert info == data.DataInfo("images", (32, 32, 3), 10)


def test_the_input_benchmark_draws_real_batches():
    from sngan_jax.data import benchmark

    source = streams.ArraySource({"images": np.zeros((40, 4, 4, 3), np.uint8)})
    rate = benchmark.images_per_second(source, batch_size=8, seconds=0.05)
    assert rate > 0 and np.isfinite(rate)


def test_preloaded_and_streamed_tfds_batches_are_the_same():
    indices = np.array([7, 0, 19, 3])
    with tfds.testing.mock_data(num_examples=20):
        streamed = tfds_source.open_source(
            tfds_dataset("cifar10", preload_max_gb=0), 32
        )
        preloaded = tfds_source.open_source(tfds_dataset("cifar10"), 32)
        assert streamed.arrays is None and preloaded.arrays is not None
        a, b = streamed.get_batch(indices), preloaded.get_batch(indices)
    assert np.array_equal(a["images"], b["images"])
    assert np.array_equal(a["labels"], b["labels"])


def test_a_class_conditional_step_on_labelled_mock_data(tmp_path):
    config = tiny_cifar_config(1)
    config.model.name = "resnet"
    config.model.num_classes = 10
    config.model.ch = 2
    with tfds.testing.mock_data(num_examples=16):
        state = loop.train_and_evaluate(config, str(tmp_path))
    assert int(state.step) == 1
    assert "embed" in state.d_params  # the projection term's class embedding
