#!/usr/bin/env python3
"""A small distributed DCGAN with the command line and log lines of upstream's app.

Upstream (eborin/Distributed-DCGAN, ``dist_dcgan.py``) needs torchvision, numpy
and Pillow, and its 64x64 network is slow on CPU-only test machines.  This demo
is launched the same way (``torchrun ... dist_dcgan.py --dataset cifar10
--dataroot DIR ...``), accepts the same arguments and prints the same log lines
with the same format strings, so tooling that drives or parses upstream can be
exercised anywhere with nothing but torch and the standard library.

Differences from upstream, all deliberate:

* Defaults are chosen for speed on 2 CPU cores: ``--image_size 32`` (the native
  CIFAR size, so no resizing), ``--ngf/--ndf 32`` (upstream: 64/64/64) and
  ``--max_workers 0`` (upstream: 4; worker processes only add start-up cost for
  an in-memory data set).  Pass upstream's values to get upstream's network: the
  layers are built for any power-of-two ``--image_size`` and equal upstream's at 64.
* Only ``--dataset cifar10`` is implemented; ``--download`` is accepted but never
  downloads (use demo/make_cifar.py for a synthetic set).
* The sampler is re-shuffled each epoch (``set_epoch``); upstream reuses one order.
* The DCGAN weight initialisation is applied; upstream defines it but never calls it.
* Samples from the fixed noise are drawn under ``no_grad`` (upstream builds a graph).
* CIFAR files are read with a restricted unpickler that only rebuilds the uint8
  array, so no numpy is needed and a tampered file cannot run code.
* A missing data file stops every rank with one clear line instead of a
  traceback on one rank and a hang on the others.
"""

from __future__ import annotations

import argparse
import codecs
import gc
import math
import os
import pickle
import random
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch import nn, optim
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

# Same choices as upstream so its command lines parse; only cifar10 runs.
DATASET_CHOICES = ["cifar10", "lsun", "mnist", "imagenet", "folder", "lfw", "fake"]
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = [f"data_batch_{n}" for n in range(1, 6)]
CIFAR_TEST_FILES = ["test_batch"]
CIFAR_SIDE = 32
SAMPLE_EVERY = 100  # upstream's image-dump interval, in iterations


def log(line: str, stream: TextIO | None = None) -> None:
    """Write one whole line and flush it, so a tailed log shows progress live.

    A single write per line matters: under PYTHONUNBUFFERED, print() emits the text
    and the newline separately, and ranks sharing one terminal then interleave
    mid-line.
    """
    out = sys.stdout if stream is None else stream
    out.write(line + "\n")
    out.flush()


class DatasetError(Exception):
    """The data set could not be read; the message is meant for the user."""


# --------------------------------------------------------------------------
# CIFAR-10 python-format reader (no numpy)
# --------------------------------------------------------------------------


class _PickledArray:
    """Stands in for a numpy ndarray while unpickling; keeps its raw bytes."""

    def __init__(self) -> None:
        self.shape: tuple[int, ...] = ()
        self.dtype: Any = None
        self.fortran = False
        self.raw = b""

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        # numpy writes (version, shape, dtype, is_fortran, raw); very old files omit version.
        if len(state) == 5:
            state = state[1:]
        shape, dtype, fortran, raw = state
        if isinstance(raw, str):
            # Python 2 pickles carry the bytes as str; encoding="latin1" maps them 1:1.
            raw = raw.encode("latin1")
        self.shape = tuple(int(n) for n in shape)
        self.dtype = dtype
        self.fortran = bool(fortran)
        self.raw = bytes(raw)


class _PickledDtype:
    """Stands in for numpy.dtype; only its name matters here."""

    def __init__(self, name: str | bytes, *_flags: Any) -> None:
        self.name = name.decode("latin1") if isinstance(name, bytes) else str(name)

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _reconstruct(_cls: Any, _shape: Any, _typecode: Any) -> _PickledArray:
    return _PickledArray()


def _frombuffer(buf: bytes, dtype: _PickledDtype, shape: Any, order: str) -> _PickledArray:
    # numpy's reducer for pickle protocol 5, in case someone re-pickled the data.
    array = _PickledArray()
    array.__setstate__((shape, dtype, order == "F", bytes(buf)))
    return array


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): _PickledArray,
    ("numpy", "dtype"): _PickledDtype,
    # Python 3 protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
    ("_codecs", "encode"): codecs.encode,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}") from None


def _field(entry: dict[Any, Any], key: str) -> Any:
    # Python 2 files give str keys under encoding="latin1"; Python 3 re-pickles give bytes.
    if key in entry:
        return entry[key]
    if key.encode() in entry:
        return entry[key.encode()]
    raise KeyError(key)


def read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one CIFAR-10 python batch file.

    Returns images as uint8 ``N x 3 x 32 x 32`` and labels as int64 ``N``.
    Raises DatasetError with a user-facing message on any problem.
    """
    try:
        with open(path, "rb") as f:
            entry = _CifarUnpickler(f, encoding="latin1").load()
        array = _field(entry, "data")
        labels = [int(label) for label in _field(entry, "labels")]
    except FileNotFoundError:
        raise DatasetError(
            f"CIFAR-10 file not found: {path} "
            f"(create a synthetic set with: python demo/make_cifar.py --out {path.parent.parent})"
        ) from None
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
        raise DatasetError(f"cannot read CIFAR-10 file {path}: {exc}") from None
    if not isinstance(array, _PickledArray):
        raise DatasetError(f"cannot read CIFAR-10 file {path}: 'data' is not an array")
    dtype_name = getattr(array.dtype, "name", "")
    row = 3 * CIFAR_SIDE * CIFAR_SIDE
    if dtype_name not in ("u1", "|u1", "uint8") or len(array.shape) != 2 or array.shape[1] != row:
        raise DatasetError(
            f"cannot read CIFAR-10 file {path}: expected uint8 N x {row} data, got {dtype_name} {array.shape}"
        )
    if len(array.raw) != array.shape[0] * row or len(labels) != array.shape[0]:
        raise DatasetError(f"cannot read CIFAR-10 file {path}: truncated or inconsistent")
    flat = torch.frombuffer(bytearray(array.raw), dtype=torch.uint8)
    if array.fortran:
        flat = flat.reshape(row, array.shape[0]).t().contiguous()
    images = flat.reshape(array.shape[0], 3, CIFAR_SIDE, CIFAR_SIDE)
    return images, torch.tensor(labels, dtype=torch.int64)


def load_cifar10(dataroot: str | Path, train: bool) -> TensorDataset:
    """Load the train (data_batch_1..5) or test (test_batch) split as uint8 tensors."""
    folder = Path(dataroot) / CIFAR_FOLDER
    names = CIFAR_TRAIN_FILES if train else CIFAR_TEST_FILES
    parts = [read_cifar_batch(folder / name) for name in names]
    images = torch.cat([p[0] for p in parts])
    labels = torch.cat([p[1] for p in parts])
    return TensorDataset(images, labels)


def to_model_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 images to floats in [-1, 1] at ``image_size``, like upstream's transforms."""
    x = images.float().div_(255.0)
    if x.shape[-1] != image_size:
        # Resize + ToTensor in upstream resize with antialiased bilinear (PIL).
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        ).clamp_(0.0, 1.0)
    return x.sub_(0.5).div_(0.5)


# --------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------


def _num_upsamplings(image_size: int) -> int:
    steps = int(round(math.log2(image_size))) - 2
    if image_size < 8 or 2 ** (steps + 2) != image_size:
        raise ValueError(f"--image_size must be a power of two >= 8, got {image_size}")
    return steps


class Generator(nn.Module):
    """DCGAN generator: z (nz x 1 x 1) to nc x image_size x image_size in [-1, 1]."""

    def __init__(self, nz: int, ngf: int, nc: int, image_size: int) -> None:
        super().__init__()
        steps = _num_upsamplings(image_size)
        width = ngf * 2 ** (steps - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(nz, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(True),
        ]
        for _ in range(steps - 1):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(True),
            ]
            width //= 2
        layers += [nn.ConvTranspose2d(width, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class Discriminator(nn.Module):
    """DCGAN discriminator: image to the probability that it is real."""

    def __init__(self, ndf: int, nc: int, image_size: int) -> None:
        super().__init__()
        steps = _num_upsamplings(image_size)
        width = ndf
        layers: list[nn.Module] = [
            nn.Conv2d(nc, width, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        for _ in range(steps - 1):
            layers += [
                nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width *= 2
        layers += [nn.Conv2d(width, 1, 4, 1, 0, bias=False), nn.Sigmoid()]
        self.main = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images).view(-1)


def weights_init(module: nn.Module) -> None:
    """DCGAN paper initialisation: N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------
# PNG output (no Pillow)
# --------------------------------------------------------------------------


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """Tile ``B x C x H x W`` images into ``3 x H' x W'``, min-max normalised to [0, 1].

    Mirrors ``torchvision.utils.save_image(..., normalize=True)``: one range for the
    whole batch, black 2-pixel padding, 8 images per row, grey images as RGB.
    """
    images = images.detach().float().cpu().clone()
    low, high = float(images.min()), float(images.max())
    images.clamp_(low, high).sub_(low).div_(max(high - low, 1e-5))
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    count, channels, height, width = images.shape
    if count == 1:
        return images[0]
    cols = min(nrow, count)
    rows = math.ceil(count / cols)
    cell_h, cell_w = height + padding, width + padding
    grid = torch.zeros(channels, rows * cell_h + padding, cols * cell_w + padding)
    for n in range(count):
        y, x = divmod(n, cols)
        top, left = y * cell_h + padding, x * cell_w + padding
        grid[:, top : top + height, left : left + width] = images[n]
    return grid


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_png(rgb: torch.Tensor) -> bytes:
    """Encode a ``3 x H x W`` float image in [0, 1] as an 8-bit RGB PNG."""
    pixels = rgb.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()
    height, width, _ = pixels.shape
    flat = bytes(pixels.view(-1).tolist())
    stride = width * 3
    # Filter type 0 (None) per scanline: simple, and zlib still compresses well.
    scanlines = b"".join(b"\x00" + flat[row * stride : (row + 1) * stride] for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(scanlines, 6))
        + _png_chunk(b"IEND", b"")
    )


def save_image(images: torch.Tensor, path: str | Path) -> None:
    """Write a batch as one PNG grid, like ``vutils.save_image(normalize=True)``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(encode_png(make_grid(images)))
    # Rename so anything watching the folder never sees a half-written PNG.
    tmp.replace(path)


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Upstream's arguments, in upstream's order (the printed Namespace matches)."""
    parser = argparse.ArgumentParser(
        description=(
            "Small distributed DCGAN, CLI- and log-compatible with upstream "
            "Distributed-DCGAN. Launch with torchrun. Defaults differ from upstream "
            "for speed on CPUs (upstream: --image_size 64 --ngf 64 --ndf 64 --max_workers 4)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, choices=DATASET_CHOICES, help="only cifar10 is implemented")
    parser.add_argument("--dataroot", required=True, help="Path to dataset (holding cifar-10-batches-py/)")
    parser.add_argument(
        "--local_rank",
        "--local-rank",
        type=int,
        help="Local rank (set by torch.distributed.launch; torchrun sets LOCAL_RANK instead).",
    )
    parser.add_argument("--num_epochs", type=int, default=25, help="Number of training epochs.")
    parser.add_argument("--download", action="store_true", help="Accepted for compatibility; never downloads.")
    parser.add_argument("--batch_size", type=int, default=32, help="Training batch size for one process.")
    parser.add_argument("--learning_rate", type=float, default=0.0002, help="Learning rate.")
    parser.add_argument(
        "--image_size",
        type=int,
        default=32,
        help="The height / width of the input image to network (power of two; upstream: 64)",
    )
    parser.add_argument("--test_data", action="store_true", help="use test instead of train data")
    parser.add_argument("--seed", type=int, default=0, help="Set a manual random seed")
    parser.add_argument("--cuda", action="store_true", help="enables cuda")
    parser.add_argument("--beta1", type=float, default=0.5, help="Beta1 for adam.")
    parser.add_argument("--nz", type=int, default=100, help="Size of the latent z vector")
    parser.add_argument("--ngf", type=int, default=32, help="Generator width (upstream: 64)")
    parser.add_argument("--ndf", type=int, default=32, help="Discriminator width (upstream: 64)")
    parser.add_argument("--out_folder", default=".", help="folder to output images")
    parser.add_argument(
        "--max_workers",
        type=int,
        default=0,
        help="Number of workers to perform loading (upstream: 4)",
    )
    return parser


def set_random_seeds(seed: int, use_cuda: bool) -> None:
    """Seed every generator the run uses.

    As upstream, every rank uses the same seed: DDP broadcasts rank 0's weights
    anyway, and this keeps the fixed noise (and, as in upstream, each step's noise)
    identical across ranks, which makes the ranks' logs comparable.
    """
    torch.manual_seed(seed)
    random.seed(seed)
    if use_cuda:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    log(f"Using seed: {seed}")


def _load_on_all_ranks(argv: argparse.Namespace) -> TensorDataset | None:
    """Load the data set; None on every rank if any rank could not."""
    dataset: TensorDataset | None = None
    try:
        dataset = load_cifar10(argv.dataroot, train=not argv.test_data)
    except DatasetError as exc:
        log(f"error: {exc}", sys.stderr)
    # Agree before going on: otherwise a rank that failed would exit and leave the
    # others blocked in the first barrier until the gloo timeout (30 min).
    ok = torch.tensor([1 if dataset is not None else 0])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if dataset is None or int(ok) == 0:
        if dataset is not None:
            log(f"error: [rank: {dist.get_rank()}] stopping: another rank could not load the data set", sys.stderr)
        return None
    log(f"Dataset {argv.dataset} loaded")
    return dataset


def run(argv: argparse.Namespace) -> int:
    """Join the process group, train, leave it; returns the exit status."""
    set_random_seeds(argv.seed, argv.cuda)
    log(f"Using GPU: {argv.cuda}")

    dist.init_process_group(backend="gloo")
    try:
        return train(argv)
    finally:
        # The DDP reducers hold the gloo process group, so destroy_process_group
        # alone does not free it. Freed during interpreter shutdown instead, its
        # threads race C++ static destructors and a rank aborts ("terminate called
        # without an active exception"): 4 of 32 two-node runs here, which also left
        # the other node's torchrun waiting 300 s. Freeing train()'s objects first
        # releases the group while Python is alive: 0 aborts in 60 runs.
        gc.collect()
        dist.destroy_process_group()


def train(argv: argparse.Namespace) -> int:
    """The training loop proper; needs an initialised process group."""
    rank = dist.get_rank()
    world_size = dist.get_world_size()
    log(f"Rank: {rank}. World Size: {world_size}")

    if rank == 0:
        os.makedirs(argv.out_folder, exist_ok=True)

    dataset = _load_on_all_ranks(argv)
    if dataset is None:
        return 1
    sampler = DistributedSampler(dataset, seed=argv.seed)
    loader = DataLoader(dataset, batch_size=argv.batch_size, sampler=sampler, num_workers=argv.max_workers)

    if argv.cuda:
        local_rank = argv.local_rank if argv.local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        ddp_devices: dict[str, Any] = {"device_ids": [local_rank], "output_device": local_rank}
    else:
        device = torch.device("cpu")
        ddp_devices = {}

    nc = 3
    net_g = Generator(argv.nz, argv.ngf, nc, argv.image_size).to(device)
    net_d = Discriminator(argv.ndf, nc, argv.image_size).to(device)
    net_g.apply(weights_init)
    net_d.apply(weights_init)
    net_g = nn.parallel.DistributedDataParallel(net_g, **ddp_devices)
    net_d = nn.parallel.DistributedDataParallel(net_d, **ddp_devices)
    net_g.train()
    net_d.train()

    criterion = nn.BCELoss()
    optimizer_d = optim.Adam(net_d.parameters(), lr=argv.learning_rate, betas=(argv.beta1, 0.999))
    optimizer_g = optim.Adam(net_g.parameters(), lr=argv.learning_rate, betas=(argv.beta1, 0.999))

    fixed_noise = torch.randn(argv.batch_size, argv.nz, 1, 1, device=device)
    real_label, fake_label = 1.0, 0.0

    # Start the clocks together so per-epoch times are comparable across ranks.
    dist.barrier()

    for epoch in range(argv.num_epochs):
        sampler.set_epoch(epoch)
        epoch_start = time.time()
        log(f"Rank: {rank}, Epoch: {epoch}, Training ...")
        for i, (images, _labels) in enumerate(loader):
            iteration_start = time.time()
            real = to_model_input(images, argv.image_size).to(device)
            batch_size = real.size(0)

            # (1) D: maximise log(D(x)) + log(1 - D(G(z))).
            net_d.zero_grad()
            label = torch.full((batch_size,), real_label, dtype=real.dtype, device=device)
            output = net_d(real)
            err_d_real = criterion(output, label)
            err_d_real.backward()
            d_x = output.mean().item()

            noise = torch.randn(batch_size, argv.nz, 1, 1, device=device)
            fake = net_g(noise)
            label.fill_(fake_label)
            output = net_d(fake.detach())
            err_d_fake = criterion(output, label)
            err_d_fake.backward()
            d_g_z1 = output.mean().item()
            err_d = err_d_real + err_d_fake
            optimizer_d.step()

            # (2) G: maximise log(D(G(z))), i.e. fakes labelled real.
            net_g.zero_grad()
            label.fill_(real_label)
            output = net_d(fake)
            err_g = criterion(output, label)
            err_g.backward()
            d_g_z2 = output.mean().item()
            optimizer_g.step()

            iteration_time = time.time() - iteration_start
            log(
                f"[epoch: {epoch}/{argv.num_epochs}][iteration: {i}/{len(loader)}][rank: {rank}] "
                f"Loss_D: {err_d.item():.4f}, Loss_G: {err_g.item():.4f}, "
                f"D(x): {d_x:.4f}, D(G(z)): {d_g_z1:.4f} / {d_g_z2:.4f}, "
                f"iteration time: {iteration_time:.4f}s"
            )

            if i % SAMPLE_EVERY == 0:
                save_image(real, f"{argv.out_folder}/real_samples_rank_{rank}_epoch_{epoch}_iter_{i}.png")
                with torch.no_grad():
                    samples = net_g(fixed_noise)
                save_image(samples, f"{argv.out_folder}/fake_samples_rank_{rank}_epoch_{epoch}_iter_{i}.png")
                dist.barrier()

        epoch_time = time.time() - epoch_start
        log(f"[rank: {rank}] Epoch {epoch} took: {epoch_time:.4f} seconds")
    return 0


def main(args: list[str] | None = None) -> int:
    """Parse upstream's command line and train; returns the exit status."""
    parser = build_parser()
    argv = parser.parse_args(args)
    log(str(argv))
    if argv.dataset != "cifar10":
        parser.error(f"--dataset {argv.dataset} is not supported by this demo; use cifar10")
    try:
        _num_upsamplings(argv.image_size)
    except ValueError as exc:
        parser.error(str(exc))
    if argv.cuda and not torch.cuda.is_available():
        parser.error("--cuda given but torch sees no CUDA device")
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        parser.error("run me with torchrun (e.g. torchrun --standalone --nproc_per_node 2 ...)")
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
