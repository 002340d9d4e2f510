"""Cloud-like local nodes: a whole Debian per node, booted by systemd-nspawn.

A node of the `vm` flavor is what an EC2 instance is to the role: its own root
filesystem (a copy of local_tree's Debian, made once with debootstrap and cached),
its own init (systemd as its PID 1), sshd, users (a sudoer `ubuntu`, as on an
Ubuntu AMI), package database and, once the role installs it, its own Docker.
It boots inside the network namespace of a local host (local_hosts.py makes
the namespace, the address and the link), so it has the same address and no
route out: apt and pip reach the package registries through a proxy on the
cluster's gateway address, as a VPC's NAT would.

Everything here runs as root on this machine and is removed by `stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from local_netns import run
from local_tree import BASE_IMAGE_IN_NODE, LOGIN_USER, VmError

EFS_KEY_IN_NODE = "/etc/dcgan/efs_key"
# How a node mounts the EFS stand-in (the role's efs_* vars): sshfs, as root of the stand-in's SFTP.
# dir_cache=no: the ranks' watchdogs meet through small files in the run folder, and sshfs would
# otherwise show a folder's listing up to 20 s old.
EFS_MOUNT = {
    "efs_fstype": "fuse.sshfs",
    "efs_mount_options": f"allow_other,IdentityFile={EFS_KEY_IN_NODE},UserKnownHostsFile=/etc/dcgan/efs_known_hosts,"
                         "StrictHostKeyChecking=yes,reconnect,ServerAliveInterval=5,dir_cache=no,_netdev",
    "efs_packages": ["sshfs"],
}
PROXY_PORT = 8888
NSPAWN_STATE = Path("/run/systemd/nspawn")
CGROUPS = Path("/sys/fs/cgroup")
STOP_DEADLINE_S = 10.0
DISK_GB = 40  # each node's root volume, as the EC2 templates' boot_disk_size


def prepare_root(tree: Path, root: Path, *, hostname: str, authorized_key: str, proxy: str, efs_key: Path,
                 efs_known_host: str) -> None:
    """A node's own root filesystem: a copy of the tree on a disk of its own, with its name, login key,
    proxy, and the key and host key of the EFS stand-in (efs_known_host: a known_hosts line)."""
    _remove_disk(root)
    _make_disk(root)
    run("cp", "-a", f"{tree}/.", str(root))
    (root / "etc/hostname").write_text(hostname + "\n")
    # A host key of its own (the tree's came with its openssh-server, the same in every copy).
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", hostname, "-f",
         str(root / "etc/ssh/ssh_host_ed25519_key"))
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("")  # no DNS here: lookups fail at once (names are in /etc/hosts)
    ssh_dir = root / "home" / LOGIN_USER / ".ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text(authorized_key.strip() + "\n")
    uid_gid = (root / "home" / LOGIN_USER).stat()
    for path in (ssh_dir, ssh_dir / "authorized_keys"):
        os.chown(path, uid_gid.st_uid, uid_gid.st_gid)
    (root / "etc/apt/apt.conf.d/90proxy").write_text(f'Acquire::http::Proxy "{proxy}";\n')
    # Every login session reaches the registries through it.
    with open(root / "etc/environment", "a") as environment:
        environment.write(f"http_proxy={proxy}\nhttps_proxy={proxy}\nHTTP_PROXY={proxy}\nHTTPS_PROXY={proxy}\n"
                          f"no_proxy=localhost,127.0.0.1\n")
    # Docker's client hands these to builds and containers (a Dockerfile's apt and pip need them).
    docker_config = json.dumps({"proxies": {"default": {"httpProxy": proxy, "httpsProxy": proxy,
                                                         "noProxy": "localhost,127.0.0.1"}}})
    for home in (root / "root", root / "home" / LOGIN_USER):
        (home / ".docker").mkdir(exist_ok=True)
        (home / ".docker/config.json").write_text(docker_config)
        for path in (home / ".docker", home / ".docker/config.json"):
            os.chown(path, home.stat().st_uid, home.stat().st_gid)
    key = root / EFS_KEY_IN_NODE.lstrip("/")
    key.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(efs_key, key)
    key.chmod(0o600)
    (key.parent / "efs_known_hosts").write_text(efs_known_host + "\n")
    (root / BASE_IMAGE_IN_NODE.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)


def boot(root: Path, base_image: Path, namespace: str, name: str, log: Path) -> int:
    """Boot the node in the network namespace; returns the PID that `stop` ends.

    systemd-nspawn runs as PID 1 of a PID namespace of its own (unshare), so ending that one
    process ends the node, its containers and sessions, whatever state they are in. Its cgroups
    are a subtree of its own, so the node's systemd and Docker manage only their processes.
    """
    _ensure_nspawn_state()
    # The node's Docker needs IP forwarding, and nspawn gives it a read-only /proc/sys.
    run("ip", "netns", "exec", namespace, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    groups = _make_cgroups(name)
    nspawn = ["systemd-nspawn", "--quiet", "-D", str(root), "-M", name, "--boot", "--register=no", "--keep-unit",
              f"--network-namespace-path=/run/netns/{namespace}", "--resolv-conf=off", "--timezone=off",
              "--link-journal=no", "--console=passive",
              # Docker inside the node: every capability, the key and BPF calls, the cgroup tree, FUSE (sshfs).
              "--capability=all", "--system-call-filter=add_key keyctl bpf", "--bind=/sys/fs/cgroup",
              "--bind=/dev/fuse", f"--bind-ro={base_image}:{BASE_IMAGE_IN_NODE}"]
    enter_cgroups = 'for procs in $DCGAN_CGROUPS; do echo $$ > "$procs"; done; exec "$@"'
    with open(log, "ab") as out:
        return subprocess.Popen(
            ["sh", "-c", enter_cgroups, "sh", "unshare", "--pid", "--fork", "--kill-child", "--", *nspawn],
            env={**os.environ, "DCGAN_CGROUPS": " ".join(str(g / "cgroup.procs") for g in groups)},
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True).pid


def stop(pid: int, name: str, root: Path, alive: Callable[[int], bool]) -> None:
    """End the node (its PID namespace, so every process in it) and remove its tree and cgroups."""
    if pid and alive(pid):
        os.kill(pid, signal.SIGKILL)  # unshare --kill-child takes nspawn and the whole node with it
        deadline = time.monotonic() + STOP_DEADLINE_S
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    _remove_cgroups(name)
    shutil.rmtree(NSPAWN_STATE / "propagate" / name, ignore_errors=True)
    _remove_disk(root)


# A node's root filesystem is a sparse disk image of its own, loop-mounted on its root folder, as an
# EC2 instance has its root volume: removing the node unlinks one file, where deleting its tens of
# thousands of files (Docker's layers of torch among them) took a minute and a half per node here.
def _disk(root: Path) -> Path:
    return root.with_name("disk.img")


def _make_disk(root: Path) -> None:
    with open(_disk(root), "wb") as disk:
        disk.truncate(DISK_GB << 30)  # sparse: it takes only what the node writes
    run("mkfs.ext4", "-q", "-F", "-m", "0", str(_disk(root)))
    root.mkdir(parents=True, exist_ok=True)
    run("mount", "-o", "loop", str(_disk(root)), str(root))


def _remove_disk(root: Path) -> None:
    if subprocess.run(["mountpoint", "-q", str(root)]).returncode == 0:
        run("umount", str(root))  # its loop device goes with it (mount -o loop sets autoclear)
    shutil.rmtree(root, ignore_errors=True)
    _disk(root).unlink(missing_ok=True)


def start_proxy(gateway: str, subnet: str, state_dir: Path) -> int:
    """The nodes' way to the package registries: a forward proxy (tinyproxy) on the gateway address,
    open to the cluster's subnet only. Returns its PID."""
    config = state_dir / "proxy.conf"
    config.write_text(f"Port {PROXY_PORT}\nListen {gateway}\nAllow {subnet}\nTimeout 600\nMaxClients 200\n"
                      f"ConnectPort 443\nLogLevel Error\n")
    with open(state_dir / "proxy.log", "ab") as log:
        return subprocess.Popen([shutil.which("tinyproxy", path="/usr/bin:/usr/sbin:/bin:/sbin") or "tinyproxy",
                                 "-d", "-c", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True).pid


def proxy_url(gateway: str) -> str:
    return f"http://{gateway}:{PROXY_PORT}"


def _ensure_nspawn_state() -> None:
    # nspawn keeps its mount-propagation folders here and refuses to start when it cannot clean
    # them; on a machine whose PID 1 is not systemd nobody mounted the tmpfs it expects.
    NSPAWN_STATE.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mountpoint", "-q", str(NSPAWN_STATE)]).returncode != 0:
        run("mount", "-t", "tmpfs", "-o", "mode=0755", "dcgan-nspawn", str(NSPAWN_STATE))


def release_nspawn_state() -> None:
    """Unmount the tmpfs of _ensure_nspawn_state (ours: it has our source name) once no node of any
    cluster uses it: each running nspawn keeps a folder in it."""
    if any((NSPAWN_STATE / "propagate").glob("*")):
        return
    for line in Path("/proc/mounts").read_text().splitlines():
        source, target = line.split()[:2]
        if source == "dcgan-nspawn" and target == str(NSPAWN_STATE):
            subprocess.run(["umount", str(NSPAWN_STATE)], capture_output=True, check=False)


def _cgroup_dirs(name: str) -> list[Path]:
    """The node's cgroup in each of this machine's hierarchies, below this process's own."""
    dirs = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        mount = CGROUPS / ("unified" if not controllers else controllers.removeprefix("name="))
        if mount.is_dir():
            dirs.append(mount / path.lstrip("/") / f"dcgan-{name}")
    return dirs


def _make_cgroups(name: str) -> list[Path]:
    groups = _cgroup_dirs(name)
    _remove_cgroups(name)
    for group in groups:
        group.mkdir()
    if (CGROUPS / "cpuset").is_dir():  # a new cpuset is empty: give it its parent's CPUs and memory nodes
        for group in groups:
            if "cpuset" in group.parts:
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    (group / knob).write_text((group.parent / knob).read_text())
    return groups


def _remove_cgroups(name: str) -> None:
    """Every cgroup below the node's, deepest first (a cgroup goes only once empty)."""
    for group in _cgroup_dirs(name):
        if not group.exists():
            continue
        for sub in sorted((p for p in group.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            _rmdir_when_empty(sub)
        _rmdir_when_empty(group)


def _rmdir_when_empty(group: Path) -> None:
    deadline = time.monotonic() + STOP_DEADLINE_S
    while True:
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # its last processes are still exiting
            if time.monotonic() > deadline:
                raise VmError(f"cgroup {group} still has processes after {STOP_DEADLINE_S:.0f} s: "
                              f"end them (cat {group}/cgroup.procs), then `make down` again.") from None
            time.sleep(0.05)
