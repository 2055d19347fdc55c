"""Dataset loaders on real files in their real formats: IDX, CIFAR-10 pickles, .npz, loopback downloads."""

import functools
import gzip
import http.server
import io
import os
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from scalelab.config import DataConfig
from scalelab.data import DATASETS, Dataset, load_dataset
from scalelab.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from scalelab.errors import DataError


def check(ds: Dataset, shape: tuple, n_train: int, n_test: int, num_classes: int = 10) -> None:
    assert ds.input_shape == shape
    assert ds.x_train.shape == (n_train, *shape) and ds.x_test.shape == (n_test, *shape)
    assert ds.x_train.dtype == ds.x_test.dtype == torch.float32
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    assert ds.num_classes == num_classes
    for y in (ds.y_train, ds.y_test):
        assert y.min() >= 0 and y.max() < num_classes
    assert torch.isfinite(ds.x_train).all() and torch.isfinite(ds.x_test).all()


def one_line_error(cfg: DataConfig, match: str) -> str:
    with pytest.raises(DataError, match=match) as e:
        load_dataset(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# ---- registry ---------------------------------------------------------------------------------------------
def test_unknown_dataset_lists_known_names():
    msg = one_line_error(DataConfig(name="imagenet"), "unknown dataset 'imagenet'")
    assert all(name in msg for name in DATASETS)
    assert set(DATASETS) == {"mnist1d", "digits", "synthetic", "npz", "mnist", "fashion_mnist", "cifar10"}


# ---- generated and built-in -------------------------------------------------------------------------------
def test_synthetic():
    cfg = DataConfig(name="synthetic", n_train=300, n_test=50, input_dim=12, num_classes=5, seed=1)
    ds = load_dataset(cfg)
    check(ds, (12,), 300, 50, 5)
    assert len(ds.y_train.unique()) == 5
    again = load_dataset(cfg)
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)
    other = load_dataset(DataConfig(name="synthetic", n_train=300, n_test=50, input_dim=12, num_classes=5,
                                    seed=2))
    assert not torch.equal(ds.x_train, other.x_train)
    # A larger train set leaves the teacher and the test set as they were.
    bigger = load_dataset(DataConfig(name="synthetic", n_train=600, n_test=50, input_dim=12, num_classes=5,
                                     seed=1))
    assert torch.equal(bigger.x_test, ds.x_test) and torch.equal(bigger.y_test, ds.y_test)


def test_synthetic_defaults():
    check(load_dataset(DataConfig(name="synthetic")), (32,), 10000, 2000)


def test_digits():
    ds = load_dataset(DataConfig(name="digits"))
    check(ds, (1, 8, 8), 1500, 297)
    assert abs(ds.x_train.mean().item()) < 1e-4 and abs(ds.x_train.std().item() - 1) < 1e-3
    same = load_dataset(DataConfig(name="digits"))
    assert torch.equal(ds.x_test, same.x_test)
    other = load_dataset(DataConfig(name="digits", seed=1))
    assert not torch.equal(ds.y_test, other.y_test)
    check(load_dataset(DataConfig(name="digits", n_train=100, n_test=50)), (1, 8, 8), 100, 50)
    one_line_error(DataConfig(name="digits", n_train=1700, n_test=200), "digits has 1797 images")


def test_mnist1d_generates_caches_and_reuses(tmp_path, capfd):
    cfg = DataConfig(name="mnist1d", n_train=403, n_test=100, seed=5, cache_dir=str(tmp_path))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    ds = load_dataset(cfg)
    assert np.array_equal(np.random.get_state()[1], before), "the caller's numpy RNG was disturbed"
    check(ds, (1, 40), 403, 100)
    err = capfd.readouterr().err
    assert "generating MNIST-1D: 510 samples (once; cached at" in err
    (cache,) = tmp_path.glob("mnist1d-*.npz")
    assert str(cache) in err and "seed5" in cache.name and not list(tmp_path.glob(".*.tmp"))
    mtime = cache.stat().st_mtime_ns

    again = load_dataset(cfg)
    assert "generating" not in capfd.readouterr().err
    assert cache.stat().st_mtime_ns == mtime
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)

    other = load_dataset(DataConfig(name="mnist1d", n_train=403, n_test=100, seed=6, cache_dir=str(tmp_path)))
    assert not torch.equal(ds.x_train, other.x_train)
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 2


def test_mnist1d_cache_from_env_and_corrupt_cache_regenerates(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("SCALELAB_CACHE", str(tmp_path))
    cfg = DataConfig(name="mnist1d", n_train=90, n_test=10, seed=1)
    ds = load_dataset(cfg)
    (cache,) = tmp_path.glob("mnist1d-*.npz")
    cache.write_bytes(b"garbage")
    capfd.readouterr()
    again = load_dataset(cfg)
    assert "regenerating" in capfd.readouterr().err
    assert torch.equal(ds.x_train, again.x_train)


# ---- npz --------------------------------------------------------------------------------------------------
def npz_arrays(n_train=20, n_test=8):
    rng = np.random.default_rng(0)
    return {"x_train": rng.normal(size=(n_train, 3, 4)).astype(np.float64), "y_train": np.arange(n_train) % 4,
            "x_test": rng.normal(size=(n_test, 3, 4)), "y_test": np.arange(n_test) % 3}


def test_npz_good(tmp_path):
    a = npz_arrays()
    np.savez(tmp_path / "d.npz", **a)
    ds = load_dataset(DataConfig(name="npz", root=str(tmp_path / "d.npz")))
    check(ds, (3, 4), 20, 8, num_classes=4)
    assert torch.equal(ds.x_train, torch.from_numpy(a["x_train"].astype(np.float32)))  # as stored
    check(load_dataset(DataConfig(name="npz", root=str(tmp_path / "d.npz"), n_train=5)), (3, 4), 5, 8, 4)


def test_npz_errors(tmp_path):
    a = npz_arrays()
    np.savez(tmp_path / "missing.npz", x_train=a["x_train"], y_train=a["y_train"])
    msg = one_line_error(DataConfig(name="npz", root=str(tmp_path / "missing.npz")), "missing array")
    assert "x_test, y_test" in msg and "missing.npz" in msg

    (tmp_path / "text.npz").write_text("not a zip")
    one_line_error(DataConfig(name="npz", root=str(tmp_path / "text.npz")), "text.npz: not a valid .npz")

    np.savez(tmp_path / "len.npz", **{**a, "y_train": a["y_train"][:-1]})
    one_line_error(DataConfig(name="npz", root=str(tmp_path / "len.npz")),
                   "x_train has 20 samples but y_train has 19 labels")

    np.savez(tmp_path / "neg.npz", **{**a, "y_test": -a["y_test"] - 1})
    one_line_error(DataConfig(name="npz", root=str(tmp_path / "neg.npz")), "negative label")

    np.savez(tmp_path / "float.npz", **{**a, "y_train": a["y_train"].astype(np.float32)})
    one_line_error(DataConfig(name="npz", root=str(tmp_path / "float.npz")), "integer array of labels")

    np.savez(tmp_path / "obj.npz", **{**a, "x_train": np.array([{"a": 1}] * 20, dtype=object)})
    one_line_error(DataConfig(name="npz", root=str(tmp_path / "obj.npz")), "obj.npz: cannot read")

    one_line_error(DataConfig(name="npz", root=str(tmp_path / "nope.npz")), "nope.npz: no such file")
    one_line_error(DataConfig(name="npz"), "needs data.root")


# ---- IDX (MNIST, Fashion-MNIST) -------------------------------------------------------------------------
IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def idx_bytes(arr: np.ndarray) -> bytes:
    magic = IMAGES_MAGIC if arr.ndim == 3 else LABELS_MAGIC
    return struct.pack(f">I{arr.ndim}I", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def write_idx_set(root: Path, n_train=30, n_test=12, gz=False) -> dict[str, np.ndarray]:
    """Write the four MNIST files for a tiny dataset, as published (big-endian header + uint8 data)."""
    rng = np.random.default_rng(1)
    arrays = {IDX_NAMES[0]: rng.integers(0, 256, (n_train, 28, 28)),
              IDX_NAMES[1]: rng.integers(0, 10, n_train),
              IDX_NAMES[2]: rng.integers(0, 256, (n_test, 28, 28)), IDX_NAMES[3]: rng.integers(0, 10, n_test)}
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_loads(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    ds = load_dataset(DataConfig(name="mnist", root=str(tmp_path), download=False))
    check(ds, (1, 28, 28), 30, 12)
    assert torch.equal(ds.y_train, torch.from_numpy(arrays[IDX_NAMES[1]]))
    expected = (torch.from_numpy(arrays[IDX_NAMES[0]]).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(ds.x_train[:, 0], expected, atol=1e-5)
    small = load_dataset(DataConfig(name="mnist", root=str(tmp_path), n_train=10, n_test=5))
    check(small, (1, 28, 28), 10, 5)
    assert torch.equal(small.x_train, ds.x_train[:10])
    one_line_error(DataConfig(name="mnist", root=str(tmp_path), n_train=31), "only 30 samples")


def test_fashion_mnist_uses_its_own_statistics(tmp_path):
    arrays = write_idx_set(tmp_path)
    ds = load_dataset(DataConfig(name="fashion_mnist", root=str(tmp_path), download=False))
    check(ds, (1, 28, 28), 30, 12)
    expected = (torch.from_numpy(arrays[IDX_NAMES[2]]).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(ds.x_test[:, 0], expected, atol=1e-5)


def test_idx_truncated_file(tmp_path):
    write_idx_set(tmp_path)
    path = tmp_path / IDX_NAMES[0]
    path.write_bytes(path.read_bytes()[:1000])
    msg = one_line_error(DataConfig(name="mnist", root=str(tmp_path), download=False), "truncated")
    assert msg == f"{path}: truncated, header says 30x28x28 = 23536 bytes, file has 1000 bytes"
    path.write_bytes(b"\x00\x00\x08\x03\x00")
    one_line_error(DataConfig(name="mnist", root=str(tmp_path)), "less than the 16-byte header")


def test_idx_bad_magic_and_count_mismatch(tmp_path):
    arrays = write_idx_set(tmp_path)
    labels = tmp_path / IDX_NAMES[3]
    labels.write_bytes(idx_bytes(arrays[IDX_NAMES[2]]))  # an image file where the labels belong
    msg = one_line_error(DataConfig(name="mnist", root=str(tmp_path)), "bad magic number 0x00000803")
    assert str(labels) in msg
    labels.write_bytes(idx_bytes(arrays[IDX_NAMES[3]][:-1]))
    msg = one_line_error(DataConfig(name="mnist", root=str(tmp_path)), "has 12 images but .* has 11 labels")
    assert IDX_NAMES[2] in msg and IDX_NAMES[3] in msg


def test_idx_bad_gzip(tmp_path):
    write_idx_set(tmp_path, gz=True)
    path = tmp_path / f"{IDX_NAMES[1]}.gz"
    path.write_bytes(path.read_bytes()[:20])
    one_line_error(DataConfig(name="mnist", root=str(tmp_path)), f"{path}: not a valid gzip file")
    path.write_bytes(b"<html>not found</html>")
    one_line_error(DataConfig(name="mnist", root=str(tmp_path)), f"{path}: not a valid gzip file")


def test_idx_reads_gz_named_file_that_is_already_decompressed(tmp_path):
    arr = np.arange(12).reshape(12)
    (tmp_path / "labels.gz").write_bytes(idx_bytes(arr))
    assert np.array_equal(read_idx(tmp_path / "labels.gz", LABELS_MAGIC), arr)


def test_idx_missing_without_download(tmp_path):
    msg = one_line_error(DataConfig(name="mnist", root=str(tmp_path), download=False), "MNIST files missing")
    assert all(name in msg for name in IDX_NAMES) and "data.download=true" in msg


# ---- downloads over loopback ------------------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve(monkeypatch):
    """Serve a directory over HTTP on 127.0.0.1 (a random port) and return its base URL."""
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_mnist_download(tmp_path, serve, monkeypatch, capfd):
    mirror = tmp_path / "mirror"
    arrays = write_idx_set(mirror, gz=True)
    monkeypatch.setenv("SCALELAB_MNIST_URL", serve(mirror))
    root = tmp_path / "root"
    ds = load_dataset(DataConfig(name="mnist", root=str(root), download=True))
    check(ds, (1, 28, 28), 30, 12)
    assert torch.equal(ds.y_test, torch.from_numpy(arrays[IDX_NAMES[3]]))
    assert sorted(p.name for p in root.iterdir()) == sorted(f"{n}.gz" for n in IDX_NAMES)
    assert "downloading" in capfd.readouterr().err


def test_download_into_default_cache_root(tmp_path, serve, monkeypatch):
    mirror = tmp_path / "mirror"
    write_idx_set(mirror, gz=True)
    monkeypatch.setenv("SCALELAB_FASHION_MNIST_URL", serve(mirror).rstrip("/"))  # no trailing slash is fine
    ds = load_dataset(DataConfig(name="fashion_mnist", cache_dir=str(tmp_path / "cache")))
    check(ds, (1, 28, 28), 30, 12)
    assert len(list((tmp_path / "cache" / "fashion_mnist").glob("*.gz"))) == 4


def test_download_404(tmp_path, serve, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("SCALELAB_MNIST_URL", serve(tmp_path / "empty"))
    root = tmp_path / "root"
    msg = one_line_error(DataConfig(name="mnist", root=str(root), download=True), "could not download")
    assert "404" in msg and str(root) in msg
    assert not list(root.glob("*")), "a failed download must leave no partial file"


# ---- CIFAR-10 ---------------------------------------------------------------------------------------------
CIFAR_BATCHES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def write_cifar(batch_dir: Path, n=4, protocol=2) -> dict[str, dict]:
    """Write the six batches as CIFAR-10's python version does: a pickled dict of bytes keys."""
    batch_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    out = {}
    for name in CIFAR_BATCHES:
        d = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": [int(v) for v in rng.integers(0, 10, n)], b"filenames": [b"x.png"] * n}
        (batch_dir / name).write_bytes(pickle.dumps(d, protocol=protocol))
        out[name] = d
    return out


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_loads(tmp_path, protocol):
    batches = write_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    check(ds, (3, 32, 32), 20, 4)
    assert ds.y_train[:4].tolist() == batches["data_batch_1"][b"labels"]
    first = torch.from_numpy(batches["test_batch"][b"data"][0].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    assert torch.allclose(ds.x_test[0], (first - mean[:, None, None]) / std[:, None, None], atol=1e-5)
    # root may also be the batches directory itself
    check(load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "cifar-10-batches-py"), n_train=6)),
          (3, 32, 32), 6, 4)


def test_cifar10_corrupt_pickle(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    one_line_error(DataConfig(name="cifar10", root=str(tmp_path)), f"{path}: corrupt or truncated pickle")
    path.write_bytes(pickle.dumps([1, 2, 3]))
    one_line_error(DataConfig(name="cifar10", root=str(tmp_path)), f"{path}: expected a pickled dict")


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_disallowed_globals(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    evil = pickle.dumps({b"data": _Exploit(marker), b"labels": []}, protocol=2)
    (tmp_path / "test_batch").write_bytes(evil)
    msg = one_line_error(DataConfig(name="cifar10", root=str(tmp_path)), "refusing to unpickle")
    assert "system" in msg and "test_batch" in msg
    assert not marker.exists()


def test_cifar10_missing_without_download(tmp_path):
    one_line_error(DataConfig(name="cifar10", root=str(tmp_path), download=False), "CIFAR-10 batches missing")


def make_tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_cifar10_download_and_extract(tmp_path, serve, monkeypatch):
    src = tmp_path / "src"
    batches = write_cifar(src / "cifar-10-batches-py")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    make_tar(mirror / "cifar-10-python.tar.gz",
             {f"cifar-10-batches-py/{n}": (src / "cifar-10-batches-py" / n).read_bytes()
              for n in CIFAR_BATCHES})
    monkeypatch.setenv("SCALELAB_CIFAR10_URL", serve(mirror) + "cifar-10-python.tar.gz")
    ds = load_dataset(DataConfig(name="cifar10", cache_dir=str(tmp_path / "cache")))
    check(ds, (3, 32, 32), 20, 4)
    assert ds.y_test.tolist() == batches["test_batch"][b"labels"]
    root = tmp_path / "cache" / "cifar10"
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == sorted(CIFAR_BATCHES)
    assert not (root / "cifar-10-python.tar.gz").exists()


@pytest.mark.parametrize("evil", ["../escape", "/tmp/scalelab-abs-escape",
                                  "cifar-10-batches-py/../../escape"])
def test_cifar10_rejects_unsafe_archive_members(tmp_path, serve, monkeypatch, evil):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    make_tar(mirror / "cifar-10-python.tar.gz", {evil: b"x"})
    monkeypatch.setenv("SCALELAB_CIFAR10_URL", serve(mirror) + "cifar-10-python.tar.gz")
    root = tmp_path / "a" / "b"
    one_line_error(DataConfig(name="cifar10", root=str(root)), "refusing to extract unsafe member")
    assert not (tmp_path / "a" / "escape").exists() and not (tmp_path / "escape").exists()
    assert not Path("/tmp/scalelab-abs-escape").exists()


def test_cifar10_corrupt_archive(tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b garbage")
    one_line_error(DataConfig(name="cifar10", root=str(tmp_path)), "corrupt or truncated archive")


def test_download_cut_off_midway_leaves_no_file(tmp_path, monkeypatch):
    class Truncating(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # promise 10000 bytes, send 10, hang up
            self.send_response(200)
            self.send_header("Content-Length", "10000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b" + b"\x00" * 8)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Truncating)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("SCALELAB_MNIST_URL", f"http://127.0.0.1:{server.server_address[1]}/")
        root = tmp_path / "root"
        one_line_error(DataConfig(name="mnist", root=str(root)),
                       "could not download .*connection closed after 10 of 10000 bytes")
        assert not list(root.glob("*"))
    finally:
        server.shutdown()
        server.server_close()
