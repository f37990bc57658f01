"""FID, Inception Score, KID and intra-FID against closed forms and direct code."""

import numpy as np
import pytest

from sngan_jax.evaluation import metrics


def _rotation(dim, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q


def test_frechet_distance_of_gaussians_with_known_distance():
    # Covariances sharing eigenvectors: the distance has a closed form in the
    # eigenvalues, sum (sqrt(a) - sqrt(b))^2, plus the squared mean distance.
    dim = 64
    rng = np.random.default_rng(0)
    q = _rotation(dim, 1)
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, abs=1e-6)


def test_frechet_distance_of_one_dimensional_gaussians():
    # N(0, 1) and N(3, 4): 9 + 1 + 4 - 2 * 2.
    assert metrics.frechet_distance(
        np.zeros(1), np.eye(1), np.full(1, 3.0), 4 * np.eye(1)
    ) == pytest.approx(10.0, abs=1e-12)


@pytest.mark.parametrize("num_samples", [500, 40])  # full rank, then singular
def test_frechet_distance_equals_the_sqrtm_formula_of_the_references(num_samples):
    # TTUR and pytorch-fid take the trace of SciPy's sqrtm(S1 S2); ours sums
    # the square roots of the eigenvalues instead. The two must agree.
    import scipy.linalg

    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(128, 128))
    sigma1 = np.cov(rng.normal(size=(num_samples, 128)) @ mixing, rowvar=False)
    sigma2 = np.cov(rng.normal(size=(num_samples, 128)) @ mixing.T, rowvar=False)
    mu1, mu2 = rng.normal(size=128), rng.normal(size=128)
    offset = 0 if num_samples > 128 else 1e-6 * np.eye(128)  # the references' retry
    root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset)).real
    diff = mu1 - mu2
    theirs = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root)
    ours = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero():
    features = np.random.default_rng(0).normal(size=(3000, 256)) * 2 + 1
    assert abs(metrics.fid(features, features)) < 1e-6


def test_fid_falls_back_when_the_square_root_is_singular():
    # Rank-deficient covariances (fewer samples than dimensions) still give a
    # finite, non-negative distance, and identical sets give about 0.
    features = np.random.default_rng(0).normal(size=(20, 64))
    assert abs(metrics.fid(features, features)) < 1e-3
    other = np.random.default_rng(1).normal(size=(20, 64)) + 1.0
    assert metrics.fid(features, other) > 50


def test_fid_of_different_feature_sizes_is_an_error():
    with pytest.raises(ValueError, match="different feature sizes"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_inception_score_extremes():
    # Uniform predictions: p(y|x) = p(y), so the score is exactly 1.
    mean, std = metrics.inception_score(np.zeros((1000, 1008)))
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0)
    # Certain and balanced over 10 classes in every split: the score is 10.
    logits = np.full((1000, 10), -1e4)
    logits[np.arange(1000), np.arange(1000) % 10] = 0.0
    mean, std = metrics.inception_score(logits, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-9) and std < 1e-9
    # Certain but collapsed onto one class: back to 1.
    logits = np.full((1000, 10), -1e4)
    logits[:, 3] = 0.0
    assert metrics.inception_score(logits)[0] == pytest.approx(1.0)


def test_inception_score_matches_the_definition():
    logits = np.random.default_rng(0).normal(size=(500, 20)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for part in np.split(p, 5):
        marginal = part.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * np.log(q / marginal)) for q in part])))
    mean, std = metrics.inception_score(logits, splits=5)
    assert mean == pytest.approx(np.mean(scores), rel=1e-10)
    assert std == pytest.approx(np.std(scores), rel=1e-8)


def _kid_direct(x, y, subsets, subset_size, seed):
    # A loop over pairs, written from the definition, with the same subset draw.
    rng = np.random.default_rng(seed)
    d, values = x.shape[1], []
    for _ in range(subsets):
        xs = x[rng.choice(len(x), subset_size, replace=False)]
        ys = y[rng.choice(len(y), subset_size, replace=False)]
        m = subset_size
        k = lambda a, b: (np.dot(a, b) / d + 1) ** 3  # noqa: E731
        xx = sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j)
        yy = sum(k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j)
        xy = sum(k(xs[i], ys[j]) for i in range(m) for j in range(m))
        values.append(xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2 * xy / m**2)
    return np.mean(values), np.std(values)


def test_kid_matches_a_direct_implementation():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(80, 16)), rng.normal(size=(70, 16)) + 0.3
    got = metrics.kid(x, y, subsets=4, subset_size=30, seed=5)
    expected = _kid_direct(x, y, subsets=4, subset_size=30, seed=5)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # The unbiased estimate is about 0 for two draws of one distribution, and
    # clearly positive for shifted ones.
    same = metrics.kid(rng.normal(size=(500, 16)), rng.normal(size=(500, 16)))
    assert abs(same[0]) < 0.01 < got[0]


def test_intra_fid_averages_per_class_distances():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(600, 8))
    labels = np.arange(600) % 3
    class_stats = {
        c: (np.full(8, float(c)), np.eye(8)) for c in range(3)
    }  # class c's real features: N(c, I)
    mean, per_class = metrics.intra_fid(features, labels, class_stats)
    expected = [
        metrics.frechet_distance(
            *metrics.gaussian_stats(features[labels == c]), *class_stats[c]
        )
        for c in range(3)
    ]
    assert list(per_class) == [0, 1, 2]
    np.testing.assert_allclose(list(per_class.values()), expected)
    assert mean == pytest.approx(np.mean(expected))
    assert per_class[0] < per_class[1] < per_class[2]
    with pytest.raises(ValueError, match="class 3"):
        metrics.intra_fid(features, labels, {3: class_stats[0]})
