"""The Debian every cloud-like node copies: a tree made once with debootstrap, configured as a
cloud image is (a sudoer `ubuntu`, the CA this machine trusts, no per-user systemd), and the base
image made from it that the nodes' Docker knows as the Dockerfiles' FROM (no registry here).

Built on first use and cached outside any checkout; a change to its recipe makes a new one.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

# The Debian tree and its base image (about 600 MB), kept outside any checkout: every clone and CI run
# on this machine shares one.
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dcgan-clap"
SUITE = "bookworm"
# What an Ubuntu cloud image has that the role relies on: systemd, sshd, sudo, Python with apt's
# bindings (Ansible's apt module), pip and the CA bundle. Nothing of what the role installs itself.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "iproute2", "python3", "python3-apt",
            "python3-pip", "sudo", "ca-certificates")
LOGIN_USER = "ubuntu"
# The Dockerfiles' FROM lines the nodes can build on without a registry: the node's own Debian, imported
# as an image under these names (the upstream app's Dockerfile says ubuntu:20.04; ours, debian:bookworm).
BASE_IMAGE_TAGS = ("debian:bookworm", "ubuntu:20.04")
BASE_IMAGE_IN_NODE = "/var/lib/dcgan/base-image.tar"
BUILD_DEADLINE_S = 900

# Imports the base image when Docker starts, before the role's first build can ask for it: the
# image a cloud node would pull from a registry.
BASE_IMAGE_UNIT = f"""\
[Service]
ExecStartPost=/bin/sh -c 'docker image inspect {BASE_IMAGE_TAGS[0]} >/dev/null 2>&1 || {{ \
id=$(docker import {BASE_IMAGE_IN_NODE}) && for tag in {" ".join(BASE_IMAGE_TAGS)}; do docker tag $id $tag; done; }}'
"""


class VmError(RuntimeError):
    """A cloud-like node could not be made or removed; the message says what to do."""


def _run(*cmd: str, timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=timeout)


def _mirror() -> str:
    """The Debian mirror this machine's apt uses (the nodes reach it through the proxy)."""
    for sources in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        try:
            text = sources.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split()
            if words[:1] == ["deb"] and len(words) > 1:
                return next(w for w in words[1:] if not w.startswith("["))
            if words[:1] == ["URIs:"] and len(words) > 1 and "security" not in words[1]:
                return words[1]
    return "http://deb.debian.org/debian"


def needs() -> list[str]:
    """The Debian packages this machine lacks for cloud-like nodes (empty: all there)."""
    tools = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container", "tinyproxy": "tinyproxy",
             "sshfs": "sshfs"}
    return [package for tool, package in tools.items() if not shutil.which(tool, path=os.environ["PATH"]
                                                                            + ":/usr/sbin:/sbin")]


class OsTree:
    """The Debian tree every node copies, and the base image made from it: built once, cached."""

    def __init__(self, cache_dir: Path) -> None:
        # A change to what goes into the tree makes a new one.
        recipe = " ".join((SUITE, *PACKAGES, LOGIN_USER, BASE_IMAGE_UNIT, inspect.getsource(OsTree._configure)))
        recipe = hashlib.sha1(recipe.encode()).hexdigest()[:10]
        self.dir = Path(cache_dir) / f"debian-{SUITE}-{recipe}"
        self.tree = self.dir / "tree"
        self.base_image = self.dir / "base-image.tar"

    def ensure(self) -> Path:
        """The tree, built now if it is not in the cache (about a minute and a half; 300 MB)."""
        if not (self.dir / "complete").exists():
            self._build()
        return self.tree

    def _build(self) -> None:
        missing = needs()
        if missing:
            raise VmError(f"cloud-like nodes need {', '.join(missing)}: apt-get install {' '.join(missing)}.")
        work = self.dir.with_name(self.dir.name + f".{os.getpid()}.tmp")
        shutil.rmtree(work, ignore_errors=True)
        tree = work / "tree"
        try:
            _run("debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tree),
                 _mirror(), timeout=BUILD_DEADLINE_S)
        except subprocess.CalledProcessError as error:
            shutil.rmtree(work, ignore_errors=True)
            tail = (error.stdout + error.stderr).strip().splitlines()[-1:]
            raise VmError(f"debootstrap of Debian {SUITE} failed ({' '.join(tail)}): is the Debian mirror "
                          f"{_mirror()} reachable?") from None
        self._configure(tree)
        with tarfile.open(work / "base-image.tar", "w") as image:  # the tree as Docker imports it
            image.add(tree, arcname=".")
        (work / "complete").touch()
        shutil.rmtree(self.dir, ignore_errors=True)
        os.replace(work, self.dir)
        for older in self.dir.parent.glob(f"debian-{SUITE}-*"):  # trees of an earlier recipe
            if older != self.dir and not older.name.endswith(".tmp"):
                shutil.rmtree(older, ignore_errors=True)

    @staticmethod
    def _configure(tree: Path) -> None:
        """What a cloud image adds to a plain Debian: the login user, the CA, the base-image hook."""
        chroot = ("chroot", str(tree))
        _run(*chroot, "useradd", "--create-home", "--shell", "/bin/bash", LOGIN_USER)
        (tree / "etc" / "sudoers.d" / "90-cloud-user").write_text(f"{LOGIN_USER} ALL=(ALL) NOPASSWD:ALL\n")
        # pip and Docker's builds inside the node trust what this machine trusts (its CA may intercept TLS).
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", tree / "usr/local/share/ca-certificates/host.crt")
        _run(*chroot, "update-ca-certificates")
        # pip installs into the system Python, as on the Ubuntu 20.04 of upstream's Dockerfile (Debian 12
        # refuses it by default: PEP 668), whose image is this tree.
        for marker in (tree / "usr/lib").glob("python3*/EXTERNALLY-MANAGED"):
            marker.unlink()
        # No per-user systemd: it cannot start in a container on cgroup v1 ("Failed to allocate manager
        # object"), and every SSH login would wait for its start, up to a minute and a half.
        (tree / "etc/systemd/system/user@.service").symlink_to("/dev/null")
        drop_in = tree / "etc/systemd/system/docker.service.d"
        drop_in.mkdir(parents=True)
        (drop_in / "dcgan-base-image.conf").write_text(BASE_IMAGE_UNIT)
        # Nothing of the build's caches: the image and every node copy carry the tree.
        _run(*chroot, "apt-get", "clean")
        lists = tree / "var/lib/apt/lists"
        for index in lists.glob("*_*"):
            index.unlink()
        # As old as a cloud image's: apt's cache_valid_time then updates it first, as it would on EC2.
        os.utime(lists, (0, 0))
