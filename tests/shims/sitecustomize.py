"""TEST-ONLY shim: let torchvision's CIFAR10 accept the synthetic data set.

torchvision checks the md5 sums of the real CIFAR-10 files, which the synthetic
set from demo/make_cifar.py cannot match.  Put this folder on PYTHONPATH (and
nowhere else) when running the *unchanged* upstream dist_dcgan.py against
synthetic data; Python then imports this module at start-up.  It is never part of
the product and must not be installed on cluster nodes.

The patch is applied lazily, when torchvision.datasets.cifar is first imported,
so processes that never import torchvision (such as torchrun's agent) pay nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

_TARGET = "torchvision.datasets.cifar"


def _patch(module: ModuleType) -> None:
    # Both checks are needed: CIFAR10._check_integrity covers the data batches, but
    # _load_meta calls the module-level check_integrity for batches.meta.
    module.CIFAR10._check_integrity = lambda self: True
    module.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self._inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _patch(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: object, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)  # type: ignore[arg-type]
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


if _TARGET in sys.modules:
    _patch(sys.modules[_TARGET])
else:
    sys.meta_path.insert(0, _Finder())
