"""Scoring generators: feature extraction, protocols, records, the digits
classifier, evaluation during training and the ``sngan_jax.evaluate`` command."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sngan_jax
from configs import default, ring2d
from sngan_jax import data, loop
from sngan_jax.data import embedded
from sngan_jax.evaluation import digits, evaluator, protocol, records, reference
from sngan_jax.evaluation.features import FeatureExtractor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_feature_extractor_matches_direct_application_on_four_devices():
    def fn(params, images):
        flat = images.reshape(len(images), -1).astype(jnp.float32)
        return {"pool": flat * params["w"], "sum": flat.sum(-1)}

    params = {"w": np.float32(0.5)}
    images = np.random.default_rng(0).integers(0, 256, (37, 4, 4, 1), np.uint8)
    extractor = FeatureExtractor(fn, params, batch_per_device=3)
    assert len(extractor.devices) == 4 and extractor.global_batch == 12
    # Uneven input batches, re-cut into global batches; the last one padded.
    batches = [images[:5], images[5:30], images[30:]]
    out = extractor(iter(batches), len(images))
    np.testing.assert_array_equal(out["pool"], fn(params, images)["pool"])
    np.testing.assert_array_equal(out["sum"], images.reshape(37, -1).sum(-1))
    # Only the first ``total`` images are used; too few is an error.
    assert len(extractor(iter(batches), 20)["pool"]) == 20
    with pytest.raises(ValueError, match="ended after 37"):
        extractor(iter(batches), 40)


def test_protocols_and_overrides():
    paper = protocol.get("paper")
    assert (paper.num_generated, paper.num_real, paper.real_split) == (
        5000,
        10000,
        "test",
    )
    assert protocol.get("50k").num_generated == 50000
    # Overriding a count renames the protocol, so its scores are not mistaken
    # for the paper's; empty overrides keep it.
    assert protocol.get("paper", num_generated=100).name == "paper+custom"
    assert protocol.get("paper", num_generated=0, real_split="") is paper
    with pytest.raises(ValueError, match="unknown protocol"):
        protocol.get("fid50k")


def _record(step, name="paper", generator="ema", fid=10.0):
    return {
        "step": step,
        "generator": generator,
        "scores": {"digits/fid": fid},
        "protocol": {"name": name},
        "errors": {},
    }


def test_eval_files_keep_one_record_per_protocol_and_generator(tmp_path):
    records.write(str(tmp_path), _record(5, fid=3.0))
    records.write(str(tmp_path), _record(5, generator="raw", fid=4.0))
    records.write(str(tmp_path), _record(5, fid=2.0))  # replaces the first
    saved = records.read(records.eval_path(str(tmp_path), 5))
    assert [(r["generator"], r["scores"]["digits/fid"]) for r in saved] == [
        ("raw", 4.0),
        ("ema", 2.0),
    ]


def test_best_keeps_the_lowest_score_across_restarts(tmp_path):
    best = records.Best(str(tmp_path))
    assert best.update(_record(1, fid=5.0))
    assert not best.update(_record(2, fid=6.0))
    assert not best.update(_record(3, fid=float("nan")))
    assert best.update(_record(4, fid=4.0))
    reopened = records.Best(str(tmp_path))
    assert (reopened.metric, reopened.value) == ("digits/fid", 4.0)
    assert not reopened.update(_record(5, fid=4.5))
    assert json.loads((tmp_path / "best.json").read_text())["step"] == 4


def test_digits_classifier_is_accurate_and_scores_real_digits_well():
    params, info = digits.load_classifier()
    assert info["held_out_accuracy"] >= 0.95
    # The second load comes from the cache: same weights, same checksum.
    assert digits.load_classifier()[1] == info
    (train_images, _), (held_images, held_labels) = digits.split()
    out = jax.jit(digits.apply)(params, held_images)
    covered, shares = digits.class_coverage(np.asarray(out["logits"]))
    assert covered == 10 and shares.min() > 0.05
    assert covered == 10


def _evaluator(config, **eval_overrides):
    with config.unlocked():
        for key, value in eval_overrides.items():
            config.eval[key] = value
    return evaluator.Evaluator(config)


def test_digits_scores_separate_real_digits_from_noise():
    config = default.get_config()
    ev = _evaluator(config, num_generated=1000)
    images, labels = embedded.load_digits()
    rng = np.random.default_rng(0)

    def real(z, labels):  # generated = a shuffle of the real digits
        return images[rng.integers(len(images), size=len(z))]

    def noise(z, labels):
        return rng.integers(0, 256, (len(z), 8, 8, 1), np.uint8)

    def ones(z, labels):  # mode collapse onto one class
        return np.repeat(images[labels_of_one[:1]], len(z), axis=0)

    labels_of_one = np.flatnonzero(labels == 1)
    good = ev.evaluate(real, step=0, generator="raw")
    bad = ev.evaluate(noise, step=0, generator="raw")
    collapsed = ev.evaluate(ones, step=0, generator="raw")
    assert good["errors"] == {}
    g, b, c = good["scores"], bad["scores"], collapsed["scores"]
    assert g["digits/classes"] == 10 and c["digits/classes"] == 1
    assert g["digits/is_mean"] > 8 and c["digits/is_mean"] < 1.1
    assert g["digits/fid"] < 0.05 * min(b["digits/fid"], c["digits/fid"])
    assert abs(g["digits/kid_mean"]) < 0.05 * b["digits/kid_mean"]
    about = good["protocol"]["digits"]["real"]
    assert (about["num_real"], about["split"]) == (1797, "all")
    assert good["protocol"]["name"] == "paper+custom"
    assert good["protocol"]["num_generated"] == 1000


def test_class_conditional_digits_get_intra_fid():
    config = default.get_config()
    with config.unlocked():
        config.model.num_classes = 10
    ev = _evaluator(config, num_generated=1000)
    images, labels = embedded.load_digits()
    by_class = {c: images[labels == c] for c in range(10)}

    def right(z, y):  # each sample from the class it was asked for
        return np.stack([by_class[int(c)][i % 50] for i, c in enumerate(y)])

    def wrong(z, y):
        return right(z, (y + 1) % 10)

    good = ev.evaluate(right, step=0, generator="raw")["scores"]
    bad = ev.evaluate(wrong, step=0, generator="raw")["scores"]
    # Both cover all classes evenly, so the unconditional FIDs are close; only
    # intra-FID sees that the labels are wrong.
    assert good["digits/intra_fid"] < 0.2 * bad["digits/intra_fid"]
    assert bad["digits/fid"] < 2 * good["digits/fid"] + 1


def test_toy_scores_of_the_mixture_itself():
    config = ring2d.get_config()
    ev = evaluator.Evaluator(config)
    rng = np.random.default_rng(0)
    record = ev.evaluate(
        lambda z, y: embedded.sample_mixture("ring2d", len(z), rng), 7, "ema"
    )
    assert record["scores"]["toy/modes"] == 8
    assert record["scores"]["toy/high_quality"] > 0.99
    assert record["protocol"]["toy"]["num_generated"] == evaluator.TOY_SAMPLES


def _tiny_digits_config():
    config = default.get_config()
    config.total_steps = 40
    config.eval_every = 20
    config.checkpoint_every = 20
    config.log_every = 20
    config.sample_every = 40
    config.model.ch = 8
    config.eval.num_generated = 500
    return config


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("digits_eval"))
    loop.train_and_evaluate(_tiny_digits_config(), workdir)
    return workdir


def test_training_evaluates_and_keeps_the_best_checkpoint(digits_run):
    files = sorted(os.listdir(os.path.join(digits_run, "eval")))
    assert files == ["0000020.json", "0000040.json"]
    fids = {}
    for name in files:
        (record,) = records.read(os.path.join(digits_run, "eval", name))
        assert record["generator"] == "ema"
        assert (
            record["protocol"]["digits"]["real"]["features"]["held_out_accuracy"] > 0.9
        )
        fids[record["step"]] = record["scores"]["digits/fid"]
    best = json.loads(open(os.path.join(digits_run, "best.json")).read())
    assert best["metric"] == "digits/fid"
    assert best["value"] == min(fids.values())
    assert best["step"] == min(fids, key=fids.get)
    # The best checkpoint opens like any other, at the best step.
    assert sngan_jax.load(digits_run, best=True).step == best["step"]
    lines = [json.loads(x) for x in open(os.path.join(digits_run, "metrics.jsonl"))]
    evals = [x for x in lines if "eval/digits/fid" in x]
    assert [x["step"] for x in evals] == [20, 40]
    assert all(x["eval_protocol"]["name"] == "paper+custom" for x in evals)


def run_evaluate(args, env=None):
    cmd = [sys.executable, "-m", "sngan_jax.evaluate", *args]
    return subprocess.run(
        cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )


def test_evaluate_command_prints_and_writes_scores_with_protocol(digits_run):
    result = run_evaluate([f"--workdir={digits_run}", "--step=20", "--generator=raw"])
    assert result.returncode == 0, result.stderr
    assert "digits: FID" in result.stdout and "10 classes" in result.stdout
    assert "raw generator, protocol paper: 5000 generated" in result.stdout
    (ema, raw) = records.read(os.path.join(digits_run, "eval", "0000020.json"))
    assert (ema["generator"], raw["generator"]) == ("ema", "raw")
    assert raw["protocol"]["name"] == "paper" and raw["step"] == 20
    assert raw["protocol"]["num_generated"] == 5000


def test_evaluate_without_inception_weights_offline(digits_run, tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    env.pop("SNGAN_JAX_INCEPTION_WEIGHTS", None)
    result = run_evaluate(
        [
            f"--workdir={digits_run}",
            "--metrics=digits,inception",
            "--download=false",
            "--num_generated=200",
        ],
        env=env,
    )
    assert result.returncode == 1
    # The Inception metrics fail with where to get the weights and where to
    # put them; the offline metrics are still printed and written.
    assert "inception metrics unavailable" in result.stderr
    assert "pt_inception-2015-12-05-6726825d.pth" in result.stderr
    assert "digits: FID" in result.stdout
    (*_, record) = records.read(os.path.join(digits_run, "eval", "0000040.json"))
    assert "digits/fid" in record["scores"] and "inception" in record["errors"]


def test_evaluate_command_on_a_missing_run_is_a_clear_error(tmp_path):
    result = run_evaluate([f"--workdir={tmp_path}"])
    assert result.returncode == 1
    assert "no checkpoints" in result.stderr and "Traceback" not in result.stderr


def _random_inception_weights(path):
    from sngan_jax.evaluation import weights

    rng = np.random.default_rng(0)
    flat = {}
    for name, shape in weights.expected_shapes().items():
        if name.endswith("/var"):
            flat[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif name.endswith("/scale"):
            flat[name] = np.ones(shape, np.float32)
        elif name.endswith("kernel"):
            fan_in = int(np.prod(shape[:-1]))
            flat[name] = rng.normal(0, np.sqrt(2 / fan_in), shape).astype(np.float32)
        else:
            flat[name] = np.zeros(shape, np.float32)
    params = weights._unflatten(flat)
    weights.save_converted(str(path), params, source_sha256="0" * 64)
    return path


def test_inception_scores_with_their_protocol(cifar_jpeg_folder, tmp_path, monkeypatch):
    config = default.get_config()
    config.dataset.name = "image_folder"
    config.dataset.path = str(cifar_jpeg_folder)
    config.dataset.cache_dir = str(tmp_path / "folder_cache")
    config.model.image_size, config.model.channels = 32, 3
    config.eval.metrics = "inception"
    config.eval.inception_weights = str(
        _random_inception_weights(tmp_path / "random_inception.npz")
    )
    config.eval.num_generated, config.eval.num_real = 40, 60
    config.eval.batch_per_device = 4

    # Published checksums only, unless told otherwise.
    refused = evaluator.Evaluator(config).prepare()
    assert "sha256 " + "0" * 64 in refused["inception"]
    assert "--verify_weights=false" in refused["inception"]

    config.eval.verify_weights = False
    ev = evaluator.Evaluator(config)
    assert ev.prepare() == {}
    real, _ = data.image_source(config.dataset, 32, 3)
    real_images = real.get_batch(np.arange(len(real)))["images"]
    rng = np.random.default_rng(0)

    def real_like(z, labels):  # other real images than the reference's first 60
        pick = np.random.default_rng(1).integers(len(real_images) - 60, size=len(z))
        return real_images[60 + pick]

    def noise(z, labels):
        return rng.integers(0, 256, (len(z), 32, 32, 3), np.uint8)

    good = ev.evaluate(real_like, 3, "raw")
    bad = ev.evaluate(noise, 3, "raw")
    assert good["errors"] == {} and set(good["scores"]) == {
        "inception/fid",
        "inception/is_mean",
        "inception/is_std",
        "inception/kid_mean",
        "inception/kid_std",
    }
    assert good["scores"]["inception/fid"] < bad["scores"]["inception/fid"]
    assert good["scores"]["inception/kid_mean"] < bad["scores"]["inception/kid_mean"]
    about = good["protocol"]["inception"]
    assert about["real"]["features"] == {
        "network": "inception-v3-fid (pytorch-fid port)",
        "sha256": "0" * 64,
        "verified": False,
    }
    assert (about["real"]["num_real"], about["real"]["split"]) == (60, "all")
    assert good["protocol"]["num_generated"] == 40

    # The reference statistics are computed once, then read from the cache.
    def must_not_run(*args, **kwargs):
        raise AssertionError("reference statistics computed again")

    monkeypatch.setattr(reference, "_compute", must_not_run)
    again = evaluator.Evaluator(config)
    assert again.prepare() == {}
    np.testing.assert_allclose(
        again.evaluate(real_like, 3, "raw")["scores"]["inception/is_mean"],
        good["scores"]["inception/is_mean"],
        rtol=1e-6,
    )
