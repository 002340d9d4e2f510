#!/usr/bin/env python3
"""Write a small synthetic CIFAR-10 in the exact "python version" file format.

The cluster and the tests have no internet, so the DCGAN apps (upstream's and
ours) train on this instead of the real 170 MB download.  The files are byte-level
look-alikes of the originals, which were written by Python 2's cPickle with
protocol 2: dict keys and file names are Python 2 ``str`` objects and ``data`` is a
pickled numpy ``uint8`` array.  That matters because readers depend on it:
torchvision loads them with ``pickle.load(f, encoding="latin1")`` and looks up
``"data"``/``"labels"`` as text keys, while the CIFAR web page loads them with
``encoding="bytes"`` and gets ``b"data"``.  Pickling Python 3 ``bytes`` keys would
satisfy only the second reader, so the pickle stream is written by hand here; this
also means the script needs nothing but the standard library (no numpy).

Images are smooth, class-dependent coloured shapes on gradient backgrounds, so a
GAN has something learnable, and they are fully determined by the seed.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import random
import struct
import sys
from pathlib import Path

BASE_FOLDER = "cifar-10-batches-py"
MARKER_NAME = ".synthetic-cifar.json"
# Bumped whenever the produced bytes change, so an old set is regenerated.
FORMAT_VERSION = 1
SIDE = 32
PIXELS = SIDE * SIDE
ROW_BYTES = 3 * PIXELS  # 3072, as in the real data rows
TRAIN_BATCHES = 5
# Batches this large are painted on every core (a pool costs more than a few images).
PARALLEL_FROM = 256
LABEL_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


class _Py2Str(bytes):
    """Bytes to be pickled as a Python 2 ``str`` (what cPickle wrote)."""


class _Uint8Matrix:
    """A 2-D uint8 matrix to be pickled the way numpy pickles an ndarray."""

    def __init__(self, rows: int, cols: int, data: bytes) -> None:
        if len(data) != rows * cols:
            raise ValueError("matrix data does not match its shape")
        self.rows = rows
        self.cols = cols
        self.data = data


class _Py2Pickler:
    """Emit protocol-2 opcodes in the order Python 2's cPickle did.

    Only the handful of types the CIFAR files contain are supported.  cPickle
    memoised (BINPUT) only objects that something else also referenced, so the
    temporaries inside numpy's reduce tuples get no memo entry here either, and
    the stream disassembles like the original files do.
    """

    # cPickle flushed lists and dicts in batches of this many items.
    BATCH = 1000

    def __init__(self) -> None:
        self.out = bytearray()
        self.memo = 0

    def _put(self) -> None:
        self.memo += 1
        if self.memo < 256:
            self.out += b"q" + bytes([self.memo])
        else:
            self.out += b"r" + struct.pack("<I", self.memo)

    def dump(self, obj: object) -> bytes:
        self.out += b"\x80\x02"
        self._save(obj)
        self.out += b"."
        return bytes(self.out)

    def _save(self, obj: object) -> None:
        if obj is None:
            self.out += b"N"
        elif obj is True:
            self.out += b"\x88"
        elif obj is False:
            self.out += b"\x89"
        elif isinstance(obj, int):
            self._save_int(obj)
        elif isinstance(obj, _Py2Str):
            self._save_str(bytes(obj))
        elif isinstance(obj, tuple):
            self._save_tuple(obj)
        elif isinstance(obj, list):
            self._save_list(obj)
        elif isinstance(obj, dict):
            self._save_dict(obj)
        elif isinstance(obj, _Uint8Matrix):
            self._save_matrix(obj)
        else:
            raise TypeError(f"cannot pickle {type(obj).__name__} here")

    def _save_int(self, value: int) -> None:
        if 0 <= value < 0x100:
            self.out += b"K" + bytes([value])
        elif 0 <= value < 0x10000:
            self.out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            raise ValueError("integer too large for this writer")

    def _save_str(self, raw: bytes, memo: bool = True) -> None:
        if len(raw) < 256:
            self.out += b"U" + bytes([len(raw)]) + raw
        else:
            self.out += b"T" + struct.pack("<I", len(raw)) + raw
        if memo:
            self._put()

    def _save_tuple(self, items: tuple[object, ...], memo: bool = True) -> None:
        if not items:
            self.out += b")"
            return
        if len(items) <= 3:
            for item in items:
                self._save(item)
            self.out += (b"\x85", b"\x86", b"\x87")[len(items) - 1]
        else:
            self.out += b"("
            for item in items:
                self._save(item)
            self.out += b"t"
        if memo:
            self._put()

    def _save_list(self, items: list[object]) -> None:
        self.out += b"]"
        self._put()
        for start in range(0, len(items), self.BATCH):
            chunk = items[start : start + self.BATCH]
            if len(chunk) == 1:
                self._save(chunk[0])
                self.out += b"a"
                continue
            self.out += b"("
            for item in chunk:
                self._save(item)
            self.out += b"e"

    def _save_dict(self, mapping: dict[object, object]) -> None:
        self.out += b"}"
        self._put()
        pairs = list(mapping.items())
        for start in range(0, len(pairs), self.BATCH):
            chunk = pairs[start : start + self.BATCH]
            if len(chunk) == 1:
                self._save(chunk[0][0])
                self._save(chunk[0][1])
                self.out += b"s"
                continue
            self.out += b"("
            for key, value in chunk:
                self._save(key)
                self._save(value)
            self.out += b"u"

    def _global(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        self._put()

    def _save_matrix(self, matrix: _Uint8Matrix) -> None:
        # ndarray.__reduce__: _reconstruct(ndarray, (0,), 'b') then BUILD with
        # (version, shape, dtype, is_fortran, raw bytes).
        self._global("numpy.core.multiarray", "_reconstruct")
        self._global("numpy", "ndarray")
        self._save_tuple((0,), memo=False)
        self._save_str(b"b", memo=False)
        self.out += b"\x87R"
        self._put()
        self.out += b"("
        self._save(1)
        self._save_tuple((matrix.rows, matrix.cols), memo=False)
        # dtype.__reduce__: dtype('u1', 0, 1) then BUILD with its state tuple.
        self._global("numpy", "dtype")
        self._save_str(b"u1", memo=False)
        self._save(0)
        self._save(1)
        self.out += b"\x87R"
        self._put()
        self.out += b"("
        self._save(3)
        self._save_str(b"|", memo=False)
        self.out += b"NNN"
        for item in (-1, -1, 0):
            self._save(item)
        self.out += b"tb"
        self._save(False)
        self._save_str(matrix.data, memo=False)
        self.out += b"tb"


def _py2_dumps(obj: object) -> bytes:
    return _Py2Pickler().dump(obj)


def _hsv(hue: float, sat: float, val: float) -> tuple[float, float, float]:
    """HSV to RGB, each in 0..1 (colorsys would do, but this keeps it explicit)."""
    i = int(hue * 6.0) % 6
    f = hue * 6.0 - math.floor(hue * 6.0)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    return [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]


def _coverage(label: int, u: float, v: float, size: float, cos_a: float, sin_a: float) -> float:
    """How much of pixel (u, v) (centred on the shape, turned by the angle of cos_a, sin_a) the
    class's shape covers.

    Soft edges (a one-pixel ramp) keep the images smooth rather than aliased.
    """
    x, y = u * cos_a + v * sin_a, -u * sin_a + v * cos_a
    r = math.hypot(x, y)
    if label == 0:  # disc
        d = r - size
    elif label == 1:  # square
        d = max(abs(x), abs(y)) - size * 0.85
    elif label == 2:  # ring
        d = abs(r - size * 0.75) - size * 0.3
    elif label == 3:  # diamond
        d = (abs(x) + abs(y)) - size * 1.1
    elif label == 4:  # cross
        d = min(max(abs(x) - size * 0.3, abs(y) - size), max(abs(y) - size * 0.3, abs(x) - size))
    elif label == 5:  # horizontal bar
        d = max(abs(x) - size * 1.3, abs(y) - size * 0.35)
    elif label == 6:  # triangle
        d = max(y - size * 0.6, abs(x) * 1.7 + -y - size * 1.1)
    elif label == 7:  # stripes inside a disc
        d = max(r - size * 1.1, math.sin(x * 1.2) * 2.0)
    elif label == 8:  # two dots
        d = min(math.hypot(x - size * 0.6, y), math.hypot(x + size * 0.6, y)) - size * 0.45
    else:  # soft blob with a hole offset to one side
        d = max(r - size, size * 0.35 - math.hypot(x - size * 0.35, y))
    return min(1.0, max(0.0, 0.5 - d))


def _draw(label: int, rng: random.Random) -> tuple:
    """The random look of one image, drawn from the batch's stream in a fixed order."""
    hue = (label / 10.0 + rng.uniform(-0.03, 0.03)) % 1.0
    fg = _hsv(hue, rng.uniform(0.6, 0.95), rng.uniform(0.75, 1.0))
    bg_hue = (hue + 0.5 + rng.uniform(-0.1, 0.1)) % 1.0
    bg_a = _hsv(bg_hue, rng.uniform(0.2, 0.5), rng.uniform(0.15, 0.45))
    bg_b = _hsv(bg_hue, rng.uniform(0.2, 0.5), rng.uniform(0.45, 0.8))
    grad = rng.uniform(0.0, 2.0 * math.pi)
    cx = SIDE / 2 + rng.uniform(-5.0, 5.0)
    cy = SIDE / 2 + rng.uniform(-5.0, 5.0)
    size = rng.uniform(6.0, 10.0)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    return label, fg, bg_a, bg_b, grad, cx, cy, size, angle


def _paint(look: tuple) -> bytes:
    """One image as a CIFAR row: 1024 R bytes, then 1024 G, then 1024 B."""
    label, fg, bg_a, bg_b, grad, cx, cy, size, angle = look
    gx, gy = math.cos(grad), math.sin(grad)
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    red, green, blue = bytearray(PIXELS), bytearray(PIXELS), bytearray(PIXELS)
    channels = tuple(zip((red, green, blue), bg_a, bg_b, fg, strict=True))
    along_x = [(px - SIDE / 2) * gx for px in range(SIDE)]
    for py in range(SIDE):
        along_y = (py - SIDE / 2) * gy
        for px in range(SIDE):
            # Background gradient position in 0..1 along a random direction.
            t = 0.5 + (along_x[px] + along_y) / (SIDE * 1.42)
            a = _coverage(label, px + 0.5 - cx, py + 0.5 - cy, size, cos_a, sin_a)
            # Light falls off from the shape centre, giving it some shading.
            shade = 1.0 - 0.25 * min(1.0, math.hypot(px - cx, py - cy) / (size * 1.5))
            index = py * SIDE + px
            for plane, back_a, back_b, front in channels:
                value = (back_a * (1 - t) + back_b * t) * (1 - a) + front * shade * a
                plane[index] = min(255, max(0, int(value * 255.0 + 0.5)))
    return bytes(red + green + blue)


def _batch(count: int, rng: random.Random, batch_label: str, first_index: int) -> bytes:
    labels = [rng.randrange(10) for _ in range(count)]
    looks = [_draw(label, rng) for label in labels]  # in order: the stream decides every byte
    if count >= PARALLEL_FROM and (os.cpu_count() or 1) > 1:
        with multiprocessing.get_context("fork").Pool() as pool:  # pure-Python pixels: one core each
            rows = b"".join(pool.map(_paint, looks, chunksize=32))
    else:
        rows = b"".join(map(_paint, looks))
    filenames = [
        _Py2Str(f"synthetic_{LABEL_NAMES[label]}_s_{first_index + n:06d}.png".encode())
        for n, label in enumerate(labels)
    ]
    # Key order follows the original files' (Python 2 dict order).
    content = {
        _Py2Str(b"batch_label"): _Py2Str(batch_label.encode()),
        _Py2Str(b"labels"): labels,
        _Py2Str(b"data"): _Uint8Matrix(count, ROW_BYTES, rows),
        _Py2Str(b"filenames"): filenames,
    }
    return _py2_dumps(content)


def _meta(num_cases_per_batch: int) -> bytes:
    return _py2_dumps(
        {
            _Py2Str(b"num_cases_per_batch"): num_cases_per_batch,
            _Py2Str(b"label_names"): [_Py2Str(name.encode()) for name in LABEL_NAMES],
            _Py2Str(b"num_vis"): ROW_BYTES,
        }
    )


def _expected_marker(test_images: int, train_images: int, seed: int) -> dict[str, int]:
    return {
        "format_version": FORMAT_VERSION,
        "test_images": test_images,
        "train_images_per_batch": train_images,
        "seed": seed,
    }


def dataset_files() -> list[str]:
    """Names of the files a complete CIFAR-10 python folder holds."""
    return ["batches.meta", "test_batch"] + [f"data_batch_{n}" for n in range(1, TRAIN_BATCHES + 1)]


def make_dataset(out: Path, test_images: int, train_images: int, seed: int) -> Path:
    """Write (or keep) a synthetic set under ``out/cifar-10-batches-py``.

    Returns that folder.  A folder already made by this function with the same
    sizes and seed is left untouched, so repeated runs (e.g. one per cluster
    node) are cheap.  A folder holding files this function did not make (say the
    real CIFAR-10) is never overwritten.
    """
    if test_images < 1 or train_images < 1:
        raise ValueError("image counts must be at least 1")
    folder = Path(out) / BASE_FOLDER
    marker = folder / MARKER_NAME
    wanted = _expected_marker(test_images, train_images, seed)
    if marker.is_file():
        try:
            found = json.loads(marker.read_text())
        except (OSError, ValueError):
            found = None
        if found == wanted and all((folder / name).is_file() for name in dataset_files()):
            print(
                f"synthetic CIFAR-10 already in {folder} "
                f"(test {test_images}, train 5x{train_images}, seed {seed}); nothing to do",
                flush=True,
            )
            return folder
    elif any((folder / name).exists() for name in dataset_files()):
        raise FileExistsError(f"{folder} holds CIFAR-10 files not made by this script; refusing to overwrite")

    folder.mkdir(parents=True, exist_ok=True)
    # Remove the marker first so an interrupted run is never taken as complete.
    marker.unlink(missing_ok=True)
    # Separate streams per file keep each file's content independent of the others' sizes.
    files = {"test_batch": _batch(test_images, random.Random(f"{seed}:test"), "testing batch 1 of 1", 0)}
    for n in range(1, TRAIN_BATCHES + 1):
        files[f"data_batch_{n}"] = _batch(
            train_images,
            random.Random(f"{seed}:train:{n}"),
            f"training batch {n} of {TRAIN_BATCHES}",
            (n - 1) * train_images,
        )
    files["batches.meta"] = _meta(train_images)
    for name, payload in files.items():
        tmp = folder / (name + ".tmp")
        tmp.write_bytes(payload)
        tmp.replace(folder / name)
    marker.write_text(json.dumps(wanted, sort_keys=True) + "\n")
    print(
        f"wrote synthetic CIFAR-10 to {folder}: test_batch {test_images} images, "
        f"data_batch_1..{TRAIN_BATCHES} {train_images} images each, seed {seed}",
        flush=True,
    )
    return folder


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description=(
            "Write a synthetic CIFAR-10 (python pickle format, as torchvision and "
            "the DCGAN demo read it) to OUT/cifar-10-batches-py/."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="dataroot folder to write into")
    parser.add_argument("--test-images", type=int, default=512, help="images in test_batch (--test_data uses it)")
    parser.add_argument("--train-images", type=int, default=16, help="images in each of data_batch_1..5")
    parser.add_argument("--seed", type=int, default=0, help="seed; same seed gives identical files")
    args = parser.parse_args(argv)
    try:
        make_dataset(args.out, args.test_images, args.train_images, args.seed)
    except (ValueError, OSError) as exc:
        print(f"make_cifar.py: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
