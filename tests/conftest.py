"""Test set-up: four fake CPU devices, set before JAX is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import atexit  # noqa: E402
import shutil  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# Caches (the digits classifier, reference statistics) go to one temporary
# folder per test session, never to the user's ~/.cache; subprocesses inherit it.
os.environ["SNGAN_JAX_CACHE"] = tempfile.mkdtemp(prefix="sngan_jax_cache_")
atexit.register(shutil.rmtree, os.environ["SNGAN_JAX_CACHE"], ignore_errors=True)
# Inception weights in torch's cache must not be found by accident either.
os.environ["TORCH_HOME"] = os.path.join(os.environ["SNGAN_JAX_CACHE"], "torch")

CIFAR_ARCHIVE = Path(__file__).resolve().parents[2] / "shared/data/cifar10_jpeg.tar.gz"


@pytest.fixture(scope="session")
def cifar_jpeg_folder(tmp_path_factory):
    """A few hundred real CIFAR-10 training JPEGs in class folders.

    Also holds one corrupt JPEG and one text file, as user folders do. Skips
    when the shared data folder is not beside the repository.
    """
    if not CIFAR_ARCHIVE.exists():
        pytest.skip(f"{CIFAR_ARCHIVE} not found (see ../shared/data/README.md)")
    root = tmp_path_factory.mktemp("cifar")
    per_class, counts = 20, {}
    with tarfile.open(CIFAR_ARCHIVE) as archive:
        for member in archive:
            parts = member.name.split("/")
            if not member.isfile() or parts[0] != "train":
                continue
            if counts.get(parts[1], 0) < per_class:
                counts[parts[1]] = counts.get(parts[1], 0) + 1
                archive.extract(member, root, filter="data")
            if len(counts) == 10 and min(counts.values()) == per_class:
                break
    train = root / "train"
    (train / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (train / "dog" / "notes.txt").write_text("not an image")
    return train


def _jaxpr_operations(fn, *args) -> set[tuple[str, tuple[int, ...]]]:
    """(primitive, output shape) of every operation in ``fn``'s jaxpr, nested too."""
    import jax
    import jax.extend

    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.update((eqn.primitive.name, v.aval.shape) for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    # A new function each time: jax reuses traces of the same one, whatever
    # a context manager around the call says.
    walk(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr)
    return found


@pytest.fixture
def jaxpr_operations():
    """``jaxpr_operations(fn, *args)``: the operations ``fn`` traces to."""
    return _jaxpr_operations
