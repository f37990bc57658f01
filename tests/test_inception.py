"""The FID Inception network, its preprocessing, and reading its weights.

Everything runs without PyTorch except two checks against the real thing
(skipped when ``torch`` and ``pytorch_fid`` are missing): the network and
resize against pytorch-fid on random weights, and ``read_pth`` against
``torch.load`` on freshly written files.
"""

import copy
import io
import os
import pickle
import urllib.error
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sngan_jax.evaluation import inception, weights

DATA = Path(__file__).parent / "data"


def _random_params(seed: int = 0) -> dict:
    """Random weights of the right shapes with positive batch-norm variances."""
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in weights.expected_shapes().items():
        if path.endswith("/var"):
            flat[path] = rng.uniform(0.5, 1.5, shape)
        elif path.endswith("kernel"):
            flat[path] = rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
        else:
            flat[path] = rng.normal(0, 0.1, shape)
    return weights._unflatten({p: v.astype(np.float32) for p, v in flat.items()})


def _flat(params: dict) -> dict:
    return dict(weights._flatten(params))


def _assert_same_params(a: dict, b: dict) -> None:
    a, b = _flat(a), _flat(b)
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)


def _to_torch_layout(params: dict) -> dict[str, np.ndarray]:
    """The state dict pytorch-fid would hold for ``params`` (OIHW, (out, in))."""
    torch_names = {"scale": "weight", "mean": "running_mean", "var": "running_var"}
    sd = {}
    for path, value in _flat(params).items():
        *modules, leaf = path.split("/")
        if leaf == "kernel":
            leaf = "weight"
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        sd[".".join([*modules, torch_names.get(leaf, leaf)])] = value
        if leaf == "var":  # Torch also counts batches; conversion drops it.
            sd[".".join([*modules, "num_batches_tracked"])] = np.array(0)
    return sd


@pytest.fixture(scope="module")
def params():
    return _random_params()


# The network.


def test_outputs_under_pmap(params):
    """One image per fake device: shapes, and the two kinds of logits."""
    n = jax.local_device_count()
    images = np.random.default_rng(1).integers(0, 256, (n, 1, 75, 75, 3), np.uint8)

    def features(p, x):
        return inception.InceptionV3().apply({"params": p}, inception.preprocess(x, 75))

    out = jax.pmap(features, in_axes=(None, 0))(params, images)

    assert set(out) == {"pool", "logits", "logits_unbiased"}
    assert out["pool"].shape == (n, 1, inception.POOL_FEATURES)
    assert out["logits"].shape == (n, 1, inception.NUM_CLASSES)
    pool = np.asarray(out["pool"], np.float64)
    unbiased = pool @ params["fc"]["kernel"]
    np.testing.assert_allclose(out["logits_unbiased"], unbiased, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        out["logits"], unbiased + params["fc"]["bias"], rtol=1e-4, atol=1e-4
    )
    assert np.all(pool >= 0)  # Averages of ReLU outputs.


def _reference_resize(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Torch's bilinear rule (align_corners=False), one output pixel at a time."""

    def neighbours(i, in_size, out_size):
        if in_size == out_size:
            return i, i, 0.0
        x = max((i + 0.5) * in_size / out_size - 0.5, 0.0)
        low = int(np.floor(x))
        return low, min(low + 1, in_size - 1), x - low

    in_h, in_w = image.shape[:2]
    out = np.zeros((out_h, out_w, image.shape[2]))
    for i in range(out_h):
        y0, y1, wy = neighbours(i, in_h, out_h)
        for j in range(out_w):
            x0, x1, wx = neighbours(j, in_w, out_w)
            top = (1 - wx) * image[y0, x0] + wx * image[y0, x1]
            bottom = (1 - wx) * image[y1, x0] + wx * image[y1, x1]
            out[i, j] = (1 - wy) * top + wy * bottom
    return out


@pytest.mark.parametrize("in_h, in_w, size", [(5, 5, 7), (7, 7, 3), (3, 9, 5)])
def test_resize_matches_torch_rule(in_h, in_w, size):
    images = np.random.default_rng(2).integers(0, 256, (2, in_h, in_w, 3), np.uint8)
    got = inception.preprocess(images, size)

    for image, result in zip(images, np.asarray(got), strict=True):
        expected = _reference_resize(image / 255.0, size, size) * 2 - 1
        np.testing.assert_allclose(result, expected, atol=2e-6)


@pytest.mark.parametrize("in_size", [8, 400])
def test_resize_weights_at_input_size(in_size):
    """Row i of the matrix holds the two weights of output pixel i."""
    matrix = inception.bilinear_matrix(in_size, inception.INPUT_SIZE)
    ramp = np.arange(in_size, dtype=np.float64)
    expected = _reference_resize(ramp[:, None, None], inception.INPUT_SIZE, 1)
    # Float32 source coordinates near 400 are exact to about 3e-5.
    np.testing.assert_allclose(matrix @ ramp, expected[:, 0, 0], atol=1e-4)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
    assert np.all(np.count_nonzero(matrix, axis=1) <= 2)


def test_preprocess_inputs_agree():
    rng = np.random.default_rng(3)
    gray = rng.integers(0, 256, (2, 10, 12, 1), np.uint8)
    rgb = np.repeat(gray, 3, axis=-1)
    as_float = rgb.astype(np.float32) / 255 * 2 - 1

    from_uint8 = inception.preprocess(rgb, 16)
    assert from_uint8.shape == (2, 16, 16, 3) and from_uint8.dtype == jnp.float32
    np.testing.assert_allclose(
        inception.preprocess(as_float, 16), from_uint8, atol=1e-6
    )
    np.testing.assert_array_equal(inception.preprocess(gray, 16), from_uint8)
    jitted = jax.jit(inception.preprocess, static_argnums=1)
    np.testing.assert_allclose(jitted(rgb, 16), from_uint8, atol=1e-6)


def test_preprocess_keeps_input_size():
    images = np.random.default_rng(4).integers(0, 256, (1, 299, 299, 3), np.uint8)
    expected = images.astype(np.float32) / 255 * 2 - 1
    np.testing.assert_allclose(inception.preprocess(images), expected, atol=1e-6)


# Reading PyTorch files without PyTorch.


def _fixture_tensors() -> dict[str, np.ndarray]:
    """What tests/data/tensors_{zip,legacy}.pth hold."""
    return {
        "float32": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        "float64": np.array([0.1, -2.5, 1e10]),
        "float16": np.array([[0.5, -1.25], [65504, 1e-3]], np.float16),
        "bfloat16": np.array([1.5, -3.0, 256.0], ml_dtypes.bfloat16),
        "int64": np.array([-(2**40), 0, 7]),
        "int32": np.arange(-3, 3, dtype=np.int32).reshape(3, 2),
        "uint8": np.array([0, 127, 255], np.uint8),
        "bool": np.array([True, False, True]),
        "scalar": np.array(3.25, np.float32),
        "empty": np.zeros((0, 3), np.float32),
        "transposed": np.arange(12, dtype=np.float32).reshape(3, 4).T,
        "offset": np.arange(20, dtype=np.float32)[5:11],
        "window": np.arange(30).reshape(5, 6)[1:4, 2:5],
        "window_base": np.arange(30).reshape(5, 6),
    }


def _write_torch_fixtures(directory: Path) -> None:
    """Writes tensors_zip.pth and tensors_legacy.pth (how tests/data was made)."""
    import torch

    sd = {
        name: torch.from_numpy(value.astype(np.float32)).bfloat16()
        if value.dtype == ml_dtypes.bfloat16
        else torch.from_numpy(value)
        for name, value in _fixture_tensors().items()
    }
    # Views keep their full storage: not contiguous, at an offset, and shared.
    sd["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    sd["offset"] = torch.arange(20, dtype=torch.float32)[5:11]
    sd["window_base"] = torch.arange(30).reshape(5, 6)
    sd["window"] = sd["window_base"][1:4, 2:5]
    assert not sd["transposed"].is_contiguous() and sd["offset"].storage_offset()
    torch.save(sd, directory / "tensors_zip.pth")
    torch.save(
        sd, directory / "tensors_legacy.pth", _use_new_zipfile_serialization=False
    )


def _assert_fixture_tensors(got: dict) -> None:
    expected = _fixture_tensors()
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("name", ["tensors_zip.pth", "tensors_legacy.pth"])
def test_read_pth_fixtures(name):
    _assert_fixture_tensors(weights.read_pth(str(DATA / name)))


def test_read_pth_matches_torch_load(tmp_path):
    torch = pytest.importorskip("torch")
    _write_torch_fixtures(tmp_path)
    for name in ("tensors_zip.pth", "tensors_legacy.pth"):
        got = weights.read_pth(str(tmp_path / name))
        _assert_fixture_tensors(got)
        loaded = torch.load(tmp_path / name, weights_only=True)
        for key, tensor in loaded.items():
            as_float = got[key].astype(np.float32)
            np.testing.assert_array_equal(as_float, tensor.float().numpy(), key)


# A pickle that would run `touch <marker>` through os.system when loaded.
def _evil_pickle(marker: Path) -> bytes:
    return f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()


def test_refuses_code_in_pickles(tmp_path):
    marker = tmp_path / "ran"
    plain = tmp_path / "evil.pickle"
    plain.write_bytes(_evil_pickle(marker))
    zipped = tmp_path / "evil.pth"
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("evil/data.pkl", _evil_pickle(marker))

    for read in (weights.read_pth, weights.read_jax_fid_pickle):
        with pytest.raises(weights.InceptionWeightsError, match=r"os\.system"):
            read(str(plain))
    with pytest.raises(weights.InceptionWeightsError, match=r"os\.system"):
        weights.read_pth(str(zipped))
    with pytest.raises(weights.InceptionWeightsError, match=r"refusing"):
        weights.load(str(plain), verify=False)
    assert not marker.exists()


# Conversion.


def test_from_state_dict_round_trip(params):
    _assert_same_params(weights.from_state_dict(_to_torch_layout(params)), params)


@pytest.mark.parametrize(
    "change, key",
    [
        ("delete", "Mixed_6b.branch7x7_2.bn.running_var"),
        ("reshape", "fc.weight"),
        ("reshape", "Conv2d_1a_3x3.conv.weight"),
        ("add", "AuxLogits.fc.weight"),
    ],
)
def test_from_state_dict_names_bad_keys(params, change, key):
    sd = _to_torch_layout(params)
    if change == "delete":
        del sd[key]
    elif change == "reshape":
        sd[key] = sd[key][:-1]
    else:
        sd[key] = np.zeros((1008, 768), np.float32)

    with pytest.raises(weights.InceptionWeightsError, match=key.replace(".", r"\.")):
        weights.from_state_dict(sd)


def test_from_jax_fid_conv_bias(params):
    tree = jax.tree.map(np.copy, params)
    tree["Mixed_5b"]["branch1x1"]["conv"]["bias"] = np.zeros(64, np.float32)
    _assert_same_params(weights.from_jax_fid(tree), params)

    tree["Mixed_5b"]["branch1x1"]["conv"]["bias"][3] = 0.5
    with pytest.raises(weights.InceptionWeightsError, match="branch1x1/conv/bias"):
        weights.from_jax_fid(tree)


# Finding, checking and caching.


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty cache, no torch hub file, no environment override, no network."""
    monkeypatch.setenv("SNGAN_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(weights.WEIGHTS_ENV, raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(weights.urllib.request, "urlopen", offline)
    return tmp_path


def _write_jax_fid_pickle(path: Path, params: dict) -> str:
    """Writes ``params`` as jax-fid does (nested dicts of numpy arrays)."""
    tree = jax.tree.map(np.copy, params)
    tree["Conv2d_1a_3x3"]["conv"]["bias"] = np.zeros(32, np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(tree))
    return weights.sha256(str(path))


def test_load_checks_and_caches(isolated, params, monkeypatch):
    source = isolated / "weights.pickle"
    sha = _write_jax_fid_pickle(source, params)

    with pytest.raises(weights.InceptionWeightsError, match=sha) as error:
        weights.load(str(source))
    assert weights.PTH_SHA256 in str(error.value) and "verify=False" in str(error.value)

    loaded, loaded_sha = weights.load(str(source), verify=False)
    assert loaded_sha == sha
    _assert_same_params(loaded, params)
    converted = weights.converted_path(sha)
    assert os.path.isfile(converted)

    # Later loads read the converted file, never the pickle again.
    monkeypatch.setattr(weights, "read_jax_fid_pickle", None)
    _assert_same_params(weights.load(str(source), verify=False)[0], params)
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(source))
    assert weights.load(verify=False)[1] == sha

    # The converted file remembers its source, which is not a published one.
    with pytest.raises(weights.InceptionWeightsError, match=sha):
        weights.load(converted)
    assert weights.load(converted, verify=False)[1] == sha


def test_load_finds_converted_cache(isolated, params):
    weights.save_converted(
        weights.converted_path(weights.PTH_SHA256), params, weights.PTH_SHA256
    )
    loaded, sha = weights.load()
    assert sha == weights.PTH_SHA256
    _assert_same_params(loaded, params)


def test_load_finds_torch_hub_file(isolated, params):
    hub_file = isolated / "torch" / "hub" / "checkpoints" / weights.PTH_NAME
    sha = _write_jax_fid_pickle(hub_file, params)

    with pytest.raises(weights.InceptionWeightsError, match=str(hub_file)):
        weights.load()
    assert weights.load(verify=False)[1] == sha


def test_load_offline_says_what_to_do(isolated):
    for download in (True, False):
        with pytest.raises(weights.InceptionWeightsError) as error:
            weights.load(download=download)
        message = str(error.value)
        assert weights.PTH_URL in message and weights.WEIGHTS_ENV in message
        assert os.path.join(isolated, "cache", "inception", weights.PTH_NAME) in message


def test_load_downloads(isolated, params, monkeypatch):
    sha = _write_jax_fid_pickle(isolated / "served.pickle", params)
    served = (isolated / "served.pickle").read_bytes()
    monkeypatch.setattr(
        weights.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(served)
    )
    loaded, loaded_sha = weights.load(verify=False)
    assert loaded_sha == sha
    _assert_same_params(loaded, params)
    assert (isolated / "cache" / "inception" / weights.PTH_NAME).read_bytes() == served


# The acceptance test: the same numbers as pytorch-fid.


def _test_images() -> list[np.ndarray]:
    """Upsampled uint8, downsampled uint8, and upsampled float images."""
    rng = np.random.default_rng(5)
    # Noise smoothed to 300x400, so that after resizing to 299 it looks like
    # the upsampled images to the network, whose batch norm is tuned to them.
    noise = rng.uniform(0, 255, (30, 40, 3))
    rows, cols = inception.bilinear_matrix(30, 300), inception.bilinear_matrix(40, 400)
    smooth = np.einsum("oh,hwc,pw->opc", rows, noise, cols)
    return [
        rng.integers(0, 256, (3, 32, 32, 3), np.uint8),
        np.round(smooth)[None].astype(np.uint8),
        rng.uniform(-1, 1, (2, 40, 48, 3)).astype(np.float32),
    ]


def _torch_input(torch, images: np.ndarray):
    """NHWC uint8 or [-1, 1] images -> what pytorch-fid takes: NCHW in [0, 1]."""
    x = images / 255 if images.dtype == np.uint8 else (images + 1) / 2
    return torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def pytorch_fid_reference():
    """pytorch-fid's Inception with random weights, and its features of the images.

    Built offline: pytorch-fid downloads its weights inside
    ``fid_inception_v3``; the patched download returns the state dict of the
    network being built, so loading it changes nothing. Returns that network
    (its state dict is what pytorch-fid's .pth holds), pytorch-fid's wrapper,
    and the pool features (the wrapper's output) and logits (the network's
    ``fc`` applied to them).
    """
    torch = pytest.importorskip("torch")
    pfi = pytest.importorskip("pytorch_fid.inception")
    original, built = pfi._inception_v3, []

    def build(*args, **kwargs):
        built.append(original(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pfi, "_inception_v3", build)
        patch.setattr(
            pfi, "load_state_dict_from_url", lambda *a, **k: built[-1].state_dict()
        )
        model = pfi.InceptionV3([3], resize_input=True, normalize_input=True)
    network = built[-1]
    torch.manual_seed(0)
    _randomize(torch, model, network)
    model.eval()

    with torch.no_grad():
        pool = [model(_torch_input(torch, g))[0][:, :, 0, 0] for g in _test_images()]
        pool = torch.cat(pool)
        features = {"pool": pool.numpy(), "logits": network.fc(pool).numpy()}
    return network, model, features


def _randomize(torch, model, network) -> None:
    """Random weights; batch-norm statistics measured on images, then perturbed.

    Measuring on the test images keeps activations near unit scale through
    the 94 layers; perturbing makes the statistics differ from those of the
    batch, so a port that normalized with batch statistics would fail.
    """
    with torch.no_grad():
        for name, p in network.named_parameters():
            if p.ndim == 4:
                p.normal_(0, (2 / p[0].numel()) ** 0.5)
            elif name.startswith("fc."):
                p.normal_(0, 0.05)
            elif name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
        norms = [m for m in network.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # A plain average over the calls below.
        model.train()
        for images in _test_images():
            model(_torch_input(torch, images))
        for norm in norms:
            noise = torch.randn_like(norm.running_mean)
            norm.running_mean.add_(0.1 * noise * norm.running_var.sqrt())
            norm.running_var.mul_(
                torch.empty_like(norm.running_var).uniform_(0.8, 1.25)
            )


@pytest.mark.parametrize("zip_format", [True, False])
def test_matches_pytorch_fid(pytorch_fid_reference, zip_format, tmp_path, monkeypatch):
    import torch

    network, _, expected = pytorch_fid_reference
    monkeypatch.setenv("SNGAN_JAX_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "random.pth"
    torch.save(network.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    params, _ = weights.load(str(path), verify=False)

    images = jnp.concatenate([inception.preprocess(g) for g in _test_images()])
    out = _apply(params, images)

    for name, want in expected.items():
        diff = np.abs(np.asarray(out[name]) - want)
        scale = max(1.0, np.abs(want).max())
        relative = diff / np.maximum(np.abs(want), 1e-2)
        print(
            f"{name}: largest {scale:.3g}, max abs diff {diff.max():.3g}, "
            f"max rel diff {relative.max():.3g}"
        )
        # Random weights make the network amplify float32 rounding: pytorch-fid
        # itself moves by about 1e-4 when its input changes by one ulp.
        assert diff.max() <= 1e-4 * scale


@jax.jit
def _apply(params, images):
    return inception.InceptionV3().apply({"params": params}, images)


def test_matches_pytorch_fid_in_float64(pytorch_fid_reference):
    """In float64 the rounding noise is gone: the two networks compute the same."""
    import torch

    network, model, _ = pytorch_fid_reference
    model = copy.deepcopy(model).double()
    model.resize_input = model.normalize_input = False  # Fed our network input.
    # Any size from 75 up runs through both; a small one keeps this quick.
    images = np.asarray(inception.preprocess(_test_images()[0], 75), np.float64)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        want = model(x)[0][:, :, 0, 0].numpy()

    params = weights.from_state_dict(
        {k: v.double().numpy() for k, v in network.state_dict().items()}
    )
    with jax.enable_x64(True):
        params = jax.tree.map(lambda p: p.astype(np.float64), params)
        got = jax.jit(inception.InceptionV3().apply)({"params": params}, images)
        got = got["pool"]
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


def test_preprocess_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    for images in _test_images():
        want = torch.nn.functional.interpolate(
            _torch_input(torch, images),
            (299, 299),
            mode="bilinear",
            align_corners=False,
        )
        want = (2 * want - 1).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(inception.preprocess(images), want, atol=1e-6)
