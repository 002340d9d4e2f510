"""Tests of the demo app (demo/dist_dcgan.py) and its synthetic data (demo/make_cifar.py).

They check what a user relies on: the data files load the way torchvision loads
real CIFAR-10, the app runs under torchrun with two ranks and prints upstream's
log lines, writes valid PNGs, and fails clearly when the data is missing.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import pickletools
import re
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo"
DATA = Path(__file__).resolve().parent / "data"

# Upstream's per-iteration line, field by field; also checked against real upstream logs below.
ITERATION_RE = re.compile(
    r"\[epoch: (?P<epoch>\d+)/(?P<epochs>\d+)\]"
    r"\[iteration: (?P<it>\d+)/(?P<its>\d+)\]"
    r"\[rank: (?P<rank>\d+)\] "
    r"Loss_D: -?\d+\.\d{4}, Loss_G: -?\d+\.\d{4}, "
    r"D\(x\): \d\.\d{4}, D\(G\(z\)\): \d\.\d{4} / \d\.\d{4}, "
    r"iteration time: \d+\.\d{4}s"
)
EPOCH_RE = re.compile(r"\[rank: (?P<rank>\d+)\] Epoch (?P<epoch>\d+) took: \d+\.\d{4} seconds")


def _load(name: str) -> ModuleType:
    # demo/ is a folder of scripts, not a package.
    spec = importlib.util.spec_from_file_location(f"demo_{name}", DEMO / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_cifar = _load("make_cifar")
dist_dcgan = _load("dist_dcgan")


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run cmd in its own process group; on timeout kill the whole group (torchrun's workers too)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # The app must flush by itself; don't let the environment hide a missing flush.
    env.pop("PYTHONUNBUFFERED", None)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _torchrun() -> list[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _png_size(path: Path) -> tuple[int, int]:
    """Check the PNG signature and IHDR chunk (with its CRC); return (width, height)."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name}: not a PNG"
    length, kind = struct.unpack(">I4s", raw[8:16])
    assert kind == b"IHDR" and length == 13
    payload = raw[16:29]
    (crc,) = struct.unpack(">I", raw[29:33])
    assert crc == zlib.crc32(kind + payload) & 0xFFFFFFFF
    width, height, depth, colour = struct.unpack(">IIBB", payload[:10])
    assert (depth, colour) == (8, 2)
    assert raw.endswith(b"IEND\xaeB`\x82")
    return width, height


# ---------------------------------------------------------------- make_cifar


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_cifar.make_dataset(tmp_path_factory.mktemp("cifar"), 40, 8, 3)


def test_files_load_as_torchvision_loads_them(small_set: Path) -> None:
    np = pytest.importorskip("numpy")
    expected = {"test_batch": 40, **{f"data_batch_{n}": 8 for n in range(1, 6)}}
    for name, count in expected.items():
        with open(small_set / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        # torchvision indexes with text keys under latin1, as the original Python 2 files give.
        assert set(entry) == {"batch_label", "labels", "data", "filenames"}
        data = entry["data"]
        assert isinstance(data, np.ndarray)
        assert data.dtype == np.uint8 and data.shape == (count, 3072) and data.flags["C_CONTIGUOUS"]
        assert len(entry["labels"]) == count
        assert all(isinstance(x, int) and 0 <= x <= 9 for x in entry["labels"])
        assert len(entry["filenames"]) == count and entry["filenames"][0].endswith(".png")
        assert entry["batch_label"] in ("testing batch 1 of 1", f"training batch {name[-1]} of 5")
        # The CIFAR page's own recipe (encoding="bytes") must give bytes keys.
        with open(small_set / name, "rb") as f:
            as_bytes = pickle.load(f, encoding="bytes")
        assert set(as_bytes) == {b"batch_label", b"labels", b"data", b"filenames"}
        assert as_bytes[b"data"].tobytes() == data.tobytes()
    with open(small_set / "batches.meta", "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert meta["label_names"][:3] == ["airplane", "automobile", "bird"] and len(meta["label_names"]) == 10
    assert meta["num_vis"] == 3072 and meta["num_cases_per_batch"] == 8


def test_files_use_only_pickle_protocol_2(small_set: Path) -> None:
    for name in make_cifar.dataset_files():
        ops = list(pickletools.genops((small_set / name).read_bytes()))
        assert ops[0][0].name == "PROTO" and ops[0][1] == 2
        assert max(op.proto for op, _arg, _pos in ops) <= 2


def test_images_are_smooth_not_noise(small_set: Path) -> None:
    images, labels = dist_dcgan.read_cifar_batch(small_set / "test_batch")
    assert images.shape == (40, 3, 32, 32) and labels.min() >= 0 and labels.max() <= 9
    x = images.float()
    # Neighbouring pixels of uniform noise differ by ~85 on average.
    assert (x[..., 1:] - x[..., :-1]).abs().mean() < 12
    assert x.std() > 20  # not blank either
    assert len(set(labels.tolist())) > 3


def test_same_seed_same_bytes_and_second_call_does_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = make_cifar.make_dataset(tmp_path / "a", 20, 4, 7)
    second = make_cifar.make_dataset(tmp_path / "b", 20, 4, 7)
    other = make_cifar.make_dataset(tmp_path / "c", 20, 4, 8)
    for name in make_cifar.dataset_files():
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "test_batch").read_bytes() != (other / "test_batch").read_bytes()
    stamp = (first / "test_batch").stat().st_mtime_ns
    capsys.readouterr()
    make_cifar.make_dataset(tmp_path / "a", 20, 4, 7)
    assert "nothing to do" in capsys.readouterr().out
    assert (first / "test_batch").stat().st_mtime_ns == stamp
    # A different size is a different set: regenerated.
    make_cifar.make_dataset(tmp_path / "a", 24, 4, 7)
    assert dist_dcgan.read_cifar_batch(first / "test_batch")[0].shape[0] == 24


def test_never_overwrites_files_it_did_not_make(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"real data")
    with pytest.raises(FileExistsError):
        make_cifar.make_dataset(tmp_path, 10, 2, 0)
    assert (folder / "test_batch").read_bytes() == b"real data"


def test_cli_help_and_run(tmp_path: Path) -> None:
    for script in ("make_cifar.py", "dist_dcgan.py"):
        result = _run([sys.executable, str(DEMO / script), "--help"], timeout=60)
        assert result.returncode == 0 and "usage:" in result.stdout
    result = _run([sys.executable, str(DEMO / "make_cifar.py"), "--out", str(tmp_path), "--test-images", "5"])
    assert result.returncode == 0
    assert result.stdout.count("\n") == 1 and "test_batch 5 images" in result.stdout


# ---------------------------------------------------------------- dist_dcgan units


def test_reader_refuses_foreign_pickles(tmp_path: Path) -> None:
    evil = tmp_path / "test_batch"
    evil.write_bytes(pickle.dumps({"data": os.getcwd}, protocol=2))
    with pytest.raises(dist_dcgan.DatasetError, match="unexpected object"):
        dist_dcgan.read_cifar_batch(evil)


def test_png_round_trip() -> None:
    import torch

    images = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    grid = dist_dcgan.make_grid(images)
    assert tuple(grid.shape) == (3, 8, 14)  # 2 images side by side, 2-pixel black padding
    raw = dist_dcgan.encode_png(grid)
    idat = raw[raw.index(b"IDAT") + 4 : raw.index(b"IEND") - 8]
    rows = zlib.decompress(idat)
    assert len(rows) == 8 * (1 + 14 * 3)
    stride = 1 + 14 * 3  # filter byte + RGB pixels
    assert rows[1:4] == b"\x00\x00\x00"  # padding is black
    assert rows[2 * stride + 1 + 2 * 3] == 0  # red of the first image's first pixel: the batch minimum
    assert max(rows) == 255  # and the maximum maps to white


# ---------------------------------------------------------------- dist_dcgan under torchrun


def _two_ranks(dataroot: Path, epochs: int, *app_args: str) -> list[str]:
    """The demo on 2 local ranks, launched like the role launches the app."""
    return _torchrun() + ["--standalone", "--nproc_per_node", "2", str(DEMO / "dist_dcgan.py"),
                          "--dataset", "cifar10", "--dataroot", str(dataroot), "--test_data",
                          "--num_epochs", str(epochs), *app_args]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    root = tmp_path_factory.mktemp("run")
    make_cifar.make_dataset(root / "data", 96, 4, 0)
    out = root / "out"
    cmd = _two_ranks(root / "data", 2, "--batch_size", "16", "--out_folder", str(out))
    return _run(cmd), out


def test_two_ranks_train_and_log_like_upstream(two_rank_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, _out = two_rank_run
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    for rank in (0, 1):
        assert f"Rank: {rank}. World Size: 2" in lines
        assert f"Rank: {rank}, Epoch: 1, Training ..." in lines
        assert any(EPOCH_RE.fullmatch(line) and line.startswith(f"[rank: {rank}] Epoch 1 took:") for line in lines)
    assert lines.count("Using seed: 0") == 2 and lines.count("Using GPU: False") == 2
    assert lines.count("Dataset cifar10 loaded") == 2
    assert sum(line.startswith("Namespace(dataset='cifar10'") for line in lines) == 2

    iteration_lines = [line for line in lines if line.startswith("[epoch:")]
    matches = [ITERATION_RE.fullmatch(line) for line in iteration_lines]
    assert all(matches), [line for line, m in zip(iteration_lines, matches, strict=True) if not m]
    # 96 images over 2 ranks in batches of 16: 3 iterations per epoch per rank.
    seen = sorted((int(m["rank"]), int(m["epoch"]), int(m["it"])) for m in matches if m)
    assert seen == [(r, e, i) for r in (0, 1) for e in (0, 1) for i in range(3)]
    assert all(m["epochs"] == "2" and m["its"] == "3" for m in matches if m)


def test_two_ranks_write_valid_pngs(two_rank_run: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _result, out = two_rank_run
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"{kind}_samples_rank_{rank}_epoch_{epoch}_iter_0.png"
        for kind in ("fake", "real")
        for rank in (0, 1)
        for epoch in (0, 1)
    )
    for name in names:
        # 16 images of 32x32 in rows of 8 with 2-pixel padding.
        assert _png_size(out / name) == (8 * 34 + 2, 2 * 34 + 2)


def test_missing_dataset_fails_clearly(tmp_path: Path) -> None:
    cmd = _two_ranks(tmp_path / "nothing", 1, "--out_folder", str(tmp_path / "out"))
    result = _run(cmd)
    assert result.returncode != 0
    missing = str(tmp_path / "nothing" / "cifar-10-batches-py" / "test_batch")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: CIFAR-10 file not found:")]
    assert len(errors) == 2, result.stderr[-2000:]
    assert all(missing in line and "demo/make_cifar.py" in line for line in errors)


def test_other_datasets_are_refused_up_front(tmp_path: Path) -> None:
    cmd = [sys.executable, str(DEMO / "dist_dcgan.py"), "--dataset", "mnist", "--dataroot", str(tmp_path)]
    result = _run(cmd, timeout=60)
    assert result.returncode == 2
    assert "--dataset mnist is not supported by this demo" in result.stderr


# ---------------------------------------------------------------- recorded logs


@pytest.mark.parametrize("source", ["upstream", "demo"])
def test_recorded_logs_match_the_same_patterns(source: str) -> None:
    """The regexes above are checked against real runs of upstream and of the demo."""
    for rank in (0, 1):
        lines = (DATA / source / f"output-{rank}.txt").read_text().splitlines()
        iteration_lines = [line for line in lines if line.startswith("[epoch:")]
        assert iteration_lines and all(ITERATION_RE.fullmatch(line) for line in iteration_lines)
        assert all(f"[rank: {rank}]" in line for line in iteration_lines)
        assert any(EPOCH_RE.fullmatch(line) and "Epoch 1 took:" in line for line in lines)
        assert f"Rank: {rank}. World Size: 2" in lines
