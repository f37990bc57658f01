"""Scoring a generator under a protocol, during training or from a checkpoint.

Three families of metrics, chosen by ``config.eval.metrics`` (by default the
data set's usual ones):

- ``inception``: FID, KID and Inception Score with the FID Inception network,
  and intra-FID for class-conditional models; needs the published weights.
- ``digits``: the same scores with a classifier trained on the digits, and
  the number of digit classes covered; offline.
- ``toy``: modes covered and high-quality samples on the 2-D mixtures.

A family that cannot run (no Inception weights offline, no reference data)
is reported under ``errors`` with the reason; the others still run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from sngan_jax.evaluation import digits, metrics, reference, toy
from sngan_jax.evaluation import protocol as protocols
from sngan_jax.evaluation.features import FeatureExtractor

FAMILIES = ("inception", "digits", "toy")
TOY_SAMPLES = 2500  # points scored on the 2-D mixtures, as in the literature
GENERATE_CHUNK = 500  # samples generated per call

# generate(z (N, z_dim) float32, labels (N,) int32 or None) -> uint8 images
# (N, H, W, C), or float points (N, 2) for the 2-D mixtures.
GenerateFn = Callable[[np.ndarray, np.ndarray | None], np.ndarray]


class Unavailable(RuntimeError):
    """What a metric family needs is missing (the message says what to do)."""


class EvaluationError(RuntimeError):
    """Scoring cannot run; ``errors`` maps each failed family to its reason."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        reasons = "\n  ".join(f"{k}: {v}" for k, v in errors.items())
        super().__init__(
            f"evaluation cannot run:\n  {reasons}\nfix the above, or turn "
            f"evaluation during training off with --config.eval_every=0"
        )


def default_metrics(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The metric families a data set is usually scored with."""
    name = config.dataset.name
    if name in ("ring2d", "grid2d"):
        return ("toy",)
    if name == "digits":
        return ("digits",)
    return ("inception",)


def metric_families(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``config.eval.metrics`` as a tuple, or the defaults when it is empty."""
    names = [m.strip() for m in config.eval.metrics.split(",") if m.strip()]
    unknown = sorted(set(names) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown eval.metrics {unknown}; choose from {FAMILIES}")
    return tuple(names) or default_metrics(config)


class Evaluator:
    """Scores generators of one config under one protocol.

    ``prepare()`` loads the feature networks and reference statistics (slow
    the first time, cached afterwards) and returns the families that failed,
    with their reasons; ``evaluate`` then scores any number of generators.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        *,
        families: Sequence[str] | None = None,
        download: bool = True,
        devices: Sequence[Any] | None = None,
    ):
        self.config = config
        self.protocol = protocols.get(
            config.eval.protocol,
            num_generated=config.eval.num_generated,
            num_real=config.eval.num_real,
            real_split=config.eval.real_split,
        )
        self.families = tuple(families or metric_families(config))
        self.download = download
        self.devices = devices
        self.errors: dict[str, str] = {}
        self._ready: dict[str, Any] = {}

    def prepare(self) -> dict[str, str]:
        """Loads what each family needs; ``{family: reason}`` for those that failed."""
        from sngan_jax.data import DataError

        for family in self.families:
            if family in self._ready or family in self.errors:
                continue
            if family == "toy":
                self._ready["toy"] = None
                continue
            try:
                self._ready[family] = getattr(self, f"_prepare_{family}")()
            except (Unavailable, DataError, OSError, ValueError) as e:
                self.errors[family] = str(e)
        return dict(self.errors)

    def _prepare_inception(self) -> tuple[FeatureExtractor, reference.Reference]:
        from sngan_jax.evaluation import inception, weights

        verify = self.config.eval.verify_weights
        try:
            params, sha256 = weights.load(
                self.config.eval.inception_weights or None,
                download=self.download,
                verify=verify,
            )
        except weights.InceptionWeightsError as e:
            raise Unavailable(str(e)) from e

        def features(params, images):
            # Full float32 everywhere: GPUs would otherwise use TF32 for the
            # convolutions and move the features away from the reference's.
            with jax.default_matmul_precision("highest"):
                return inception.InceptionV3().apply(
                    {"params": params}, inception.preprocess(images)
                )

        extractor = self._extractor(features, params)
        meta = {
            "network": "inception-v3-fid (pytorch-fid port)",
            "sha256": sha256,
            "verified": verify,
        }
        return extractor, self._reference(extractor, meta)

    def _prepare_digits(self) -> tuple[FeatureExtractor, reference.Reference]:
        params, info = digits.load_classifier()
        extractor = self._extractor(digits.apply, params)
        return extractor, self._reference(extractor, info)

    def _extractor(self, fn, params) -> FeatureExtractor:
        return FeatureExtractor(
            fn,
            params,
            batch_per_device=self.config.eval.batch_per_device,
            devices=self.devices,
        )

    def _reference(self, extractor, meta) -> reference.Reference:
        dataset = self.config.dataset
        return reference.load(
            dataset,
            split=reference.real_split(dataset, self.protocol.real_split),
            num=self.protocol.num_real,
            image_size=self.config.model.image_size,
            channels=self.config.model.channels,
            extractor=extractor,
            extractor_meta=meta,
        )

    def evaluate(self, generate: GenerateFn, step: int, generator: str) -> dict:
        """Scores the samples of ``generate``; a record with scores and protocol.

        ``generator`` (``ema`` or ``raw``) only describes which weights
        ``generate`` uses; it is written with the scores.
        """
        self.prepare()
        start = time.perf_counter()
        scores, described = {}, {}
        for family in self.families:
            if family in self.errors:
                continue
            family_scores, about = getattr(self, f"_score_{family}")(generate)
            scores.update({f"{family}/{k}": v for k, v in family_scores.items()})
            described[family] = about
        return {
            "step": int(step),
            "generator": generator,
            "scores": scores,
            "protocol": {**self._protocol_record(), **described},
            "errors": dict(self.errors),
            "seconds": round(time.perf_counter() - start, 1),
        }

    def _protocol_record(self) -> dict[str, Any]:
        # The real images actually used (count, split) are reported by each
        # family under "real"; the protocol's requested ones would mislead
        # where a data set has fewer.
        out = self.protocol.to_dict()
        del out["num_real"], out["real_split"]
        out["generated_images"] = "uint8, as if saved to PNG"
        if self._num_classes:
            out["labels"] = "balanced over classes, in random order"
            out["samples_per_class"] = self.protocol.num_generated // self._num_classes
        return out

    # --- the families ---------------------------------------------------------

    def _score_toy(self, generate: GenerateFn) -> tuple[dict, dict]:
        z, _ = self._latents(TOY_SAMPLES)
        points = np.concatenate(list(self._generated(generate, z, None)))
        about = {"num_generated": TOY_SAMPLES, "mixture": self.config.dataset.name}
        return toy.mode_stats(points, self.config.dataset.name), about

    def _score_digits(self, generate: GenerateFn) -> tuple[dict, dict]:
        extractor, ref = self._ready["digits"]
        out, labels = self._features(generate, extractor, "digits")
        scores = self._feature_scores(out["pool"], out["logits"], labels, ref)
        scores["classes"], _ = digits.class_coverage(out["logits"])
        about = {"real": ref.meta, "classes_min_fraction": digits.MIN_FRACTION}
        return scores, about

    def _score_inception(self, generate: GenerateFn) -> tuple[dict, dict]:
        extractor, ref = self._ready["inception"]
        out, labels = self._features(generate, extractor, "inception")
        # The Inception Score uses the logits without the final bias, as the
        # original TensorFlow code (and torch-fidelity) did.
        scores = self._feature_scores(out["pool"], out["logits_unbiased"], labels, ref)
        about = {
            "real": ref.meta,
            "resize": "bilinear to 299x299 as pytorch-fid (align_corners=False)",
            "is_logits": "pool features @ fc kernel, no bias (1008 classes)",
        }
        return scores, about

    def _feature_scores(self, features, logits, labels, ref) -> dict[str, float]:
        """FID, IS and KID; intra-FID too when samples and real images have labels."""
        p = self.protocol
        is_mean, is_std = metrics.inception_score(logits, p.is_splits)
        kid_mean, kid_std = metrics.kid(
            features, ref.features, p.kid_subsets, p.kid_subset_size, p.seed
        )
        scores = {
            "fid": metrics.frechet_distance(
                *metrics.gaussian_stats(features), ref.mu, ref.sigma
            ),
            "is_mean": is_mean,
            "is_std": is_std,
            "kid_mean": kid_mean,
            "kid_std": kid_std,
        }
        if labels is not None and ref.labels is not None:
            scores["intra_fid"], _ = metrics.intra_fid(
                features, labels, ref.class_stats()
            )
        return scores

    # --- generated samples ----------------------------------------------------

    @property
    def _num_classes(self) -> int:
        return int(self.config.model.num_classes)

    def _latents(self, num: int) -> tuple[np.ndarray, np.ndarray | None]:
        """The protocol's fixed latents, and balanced labels in random order."""
        rng = np.random.default_rng(self.protocol.seed)
        z = rng.standard_normal((num, self.config.model.z_dim)).astype(np.float32)
        labels = None
        if self._num_classes:
            labels = rng.permutation(np.arange(num) % self._num_classes).astype(
                np.int32
            )
        return z, labels

    def _generated(
        self, generate: GenerateFn, z: np.ndarray, labels: np.ndarray | None
    ) -> Iterator[np.ndarray]:
        for start in range(0, len(z), GENERATE_CHUNK):
            chunk = slice(start, start + GENERATE_CHUNK)
            yield generate(z[chunk], None if labels is None else labels[chunk])

    def _features(self, generate, extractor, family):
        num = self.protocol.num_generated
        z, labels = self._latents(num)
        batches = self._generated(generate, z, labels)
        return extractor(batches, num, f"{family} features"), labels


def summary(record: dict) -> str:
    """One line per family for the console."""
    lines = []
    scores = record["scores"]
    for family in FAMILIES:
        mine = {
            k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith(family)
        }
        if not mine:
            continue
        parts = []
        if "fid" in mine:
            parts.append(f"FID {mine['fid']:.2f}")
        if "is_mean" in mine:
            parts.append(f"IS {mine['is_mean']:.2f} +- {mine['is_std']:.2f}")
        if "kid_mean" in mine:
            parts.append(f"KID {mine['kid_mean']:.4f} +- {mine['kid_std']:.4f}")
        if "intra_fid" in mine:
            parts.append(f"intra-FID {mine['intra_fid']:.2f}")
        if "classes" in mine:
            parts.append(f"{mine['classes']}/10 classes")
        if "modes" in mine:
            parts.append(
                f"{mine['modes']}/{mine['num_modes']} modes, "
                f"{mine['high_quality']:.1%} high quality"
            )
        lines.append(f"{family}: " + ", ".join(parts))
    for family, reason in record["errors"].items():
        lines.append(f"{family}: not computed: {reason}")
    p = record["protocol"]
    lines.append(
        f"(step {record['step']}, {record['generator']} generator, protocol "
        f"{p['name']}: {p['num_generated']} generated vs {_real(p)})"
    )
    return "\n".join(lines)


def _real(protocol: dict) -> str:
    for family in ("inception", "digits"):
        if family in protocol:
            real = protocol[family]["real"]
            return f"{real['num_real']} real {real['dataset']}/{real['split']}"
    return "no real images"
