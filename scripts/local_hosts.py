"""Real hosts on this machine: one network namespace, address and sshd each.

A host is what a cloud VM is to CLAP: an address that answers SSH with a key.
Each lives in its own network namespace (own interface and address on one test
subnet, no default route, so no packet leaves the machine), with its own host
name (UTS namespace) and /etc/hosts (bind-mounted by `ip netns exec` from
/etc/netns/<ns>/, never the machine's own). Its sshd runs as PID 1 of a PID
namespace of its own, so ending that one process ends every session and job on
the host: nothing outlives `destroy`. The machine's filesystem is shared by all
hosts and plays the role of the cloud's shared EFS.

A host is one of these kinds:
  netns  the namespace with an sshd, sharing this machine's filesystem (the default);
  vm     a cloud-like node: the namespace with a whole Debian booted in it (local_vm.py);
  efs    the cluster's EFS stand-in for vm nodes: a netns host whose sshd serves only
         the export folder over SFTP, which the nodes mount with sshfs (this machine's
         kernel may have no NFS; FUSE it has);
  proxy  the vm nodes' way to the package registries, on the gateway address.
The efs and proxy hosts come with the first vm node and go with the last.

`create` records what it made (hosts.json in the state folder) and `destroy`
removes exactly that, by name and PID. Needs root.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict
from pathlib import Path

import local_tree
import local_vm
from local_netns import (
    SBIN,
    SSHD,
    Host,
    LocalHostError,
    make_namespace,
    pid_alive,
    remove_namespace,
    run,
    start_sshd,
    wait_for_ssh,
)

DEFAULT_SUBNET = "10.213.0.0/24"
IPTABLES = shutil.which("iptables", path=SBIN)  # None: no firewall to get past
STOP_DEADLINE_S = 5.0


class LocalHosts:
    """The namespace hosts of one state folder and subnet."""

    def __init__(self, state_dir: Path, subnet: str = DEFAULT_SUBNET) -> None:
        self.state_dir = Path(state_dir)
        self.network = ipaddress.ip_network(subnet)
        if self.network.prefixlen > 29:
            raise LocalHostError(f"LOCAL_SUBNET={subnet} is too small: use a /24 such as {DEFAULT_SUBNET}.")
        self.gateway = str(next(self.network.hosts()))
        # Names must be unique per subnet and fit Linux's 15-character interface names.
        octets = str(self.network.network_address).split(".")
        self.tag = f"{octets[1]}-{octets[2]}"
        self.bridge = f"dcgbr{self.tag}"
        self.records = self.state_dir / "hosts.json"

    # -- state -------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[list[Host]]:
        """Read-modify-write the records under a lock; written atomically."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "hosts.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            hosts = self._load()
            try:
                yield hosts
            finally:
                tmp = self.records.with_suffix(".tmp")
                tmp.write_text(json.dumps([asdict(h) for h in hosts], indent=2))
                os.replace(tmp, self.records)

    def _load(self) -> list[Host]:
        try:
            return [Host(**h) for h in json.loads(self.records.read_text())]
        except FileNotFoundError:
            return []

    def hosts(self) -> list[Host]:
        return self._load()

    def is_up(self, host: Host) -> bool:
        return pid_alive(host.pid) and (not host.namespace or Path(f"/run/netns/{host.namespace}").exists())

    def efs_host(self) -> Host | None:
        """The EFS stand-in of the cluster's vm nodes, while they exist."""
        return next((h for h in self._load() if h.kind == "efs"), None)

    @property
    def efs_export(self) -> Path:
        """The folder the EFS stand-in serves: kept across clusters, as an EFS outlives its instances."""
        return self.state_dir / "efs-export"

    @property
    def efs_key(self) -> Path:
        """The key the vm nodes mount the EFS stand-in with."""
        return self.state_dir / "efs_key"

    # -- create ------------------------------------------------------------
    def create(self, count: int, authorized_key: str, kind: str = "netns", at: str | None = None) -> list[Host]:
        """Start `count` new hosts of `kind` (netns or vm) that accept `authorized_key` for their login:
        root on netns hosts, local_tree.LOGIN_USER (a sudoer) on vm nodes. `at`: the one host's address
        (as a cloud hands out an instance's), else the subnet's first free ones."""
        if os.geteuid() != 0:
            raise LocalHostError("the local cluster needs root (network namespaces): run as root, e.g. sudo make up.")
        if not Path(SSHD).exists():
            raise LocalHostError("sshd is not installed: apt-get install openssh-server.")
        tree = self._os_tree() if kind == "vm" else None
        made: list[Host] = []
        with self._locked() as hosts:
            try:
                self._ensure_bridge()
                if tree and not any(h.kind == "efs" for h in hosts):
                    self._start_services(hosts, made)
                for _ in range(count):
                    host = self._new_host(self._address(hosts, at, count), kind)
                    made.append(host)  # before any of it exists: a Ctrl-C half-way is cleaned up too
                    if tree:
                        self._start_vm(host, tree, authorized_key, next(h for h in hosts if h.kind == "efs"))
                    else:
                        self._start_sshd(host, authorized_key)
                    hosts.append(host)
                self._write_hosts_files(hosts)
                for host in made:
                    if host.kind != "proxy":
                        wait_for_ssh(host)
            except BaseException:
                # Ctrl-C or a failure half-way: take down what this call made, nothing else.
                for host in made:
                    self._destroy_host(host)
                    if host in hosts:
                        hosts.remove(host)
                if not hosts:
                    self._remove_bridge()
                raise
        return [host for host in made if host.kind == kind]

    def _os_tree(self) -> Path:
        try:
            return local_tree.OsTree(local_tree.CACHE).ensure()
        except local_tree.VmError as error:
            raise LocalHostError(str(error)) from None

    def _address(self, hosts: list[Host], at: str | None, count: int) -> str:
        if at is None:
            return self._free_address(hosts)
        if count != 1 or ipaddress.ip_address(at) not in self.network or at == self.gateway \
                or at in {h.address for h in hosts}:
            raise LocalHostError(f"{at} is not one free address of LOCAL_SUBNET={self.network} (not its gateway "
                                 f"{self.gateway}): ask for one host at an address no host of the subnet has.")
        return at

    def _free_address(self, hosts: list[Host], last: bool = False) -> str:
        taken = {h.address for h in hosts} | {self.gateway}
        free = [str(a) for a in self.network.hosts() if str(a) not in taken]
        if not free:
            raise LocalHostError(f"no free address left in LOCAL_SUBNET={self.network}.")
        return free[-1] if last else free[0]

    def _start_services(self, hosts: list[Host], made: list[Host]) -> None:
        """The EFS stand-in (at the subnet's last address, out of the nodes' way) and the proxy."""
        if not self.efs_key.exists():
            run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dcgan-efs", "-f", str(self.efs_key))
        self.efs_export.mkdir(mode=0o755, parents=True, exist_ok=True)  # sshd's chroot: root's, not writable
        efs = self._new_host(self._free_address(hosts, last=True), "efs")
        proxy = Host(f"proxy-{self.tag}", "", self.gateway, "", 0, str(self.state_dir / f"proxy-{self.tag}"),
                     "proxy")
        for host in (efs, proxy):
            made.append(host)  # before it starts: a failure half-way is cleaned up too
            hosts.append(host)
        self._start_sshd(efs, self.efs_key.with_suffix(".pub").read_text(), export=self.efs_export)
        Path(proxy.state_dir).mkdir(parents=True, exist_ok=True)
        proxy.pid = local_vm.start_proxy(self.gateway, str(self.network), Path(proxy.state_dir))

    def _start_vm(self, host: Host, tree: Path, authorized_key: str, efs: Host) -> None:
        make_namespace(host, self.bridge, self.network.prefixlen)
        root = Path(host.state_dir) / "root"
        efs_host_key = (Path(efs.state_dir) / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        local_vm.prepare_root(tree, root, hostname=host.name, authorized_key=authorized_key,
                              proxy=local_vm.proxy_url(self.gateway), efs_key=self.efs_key,
                              efs_known_host=" ".join([efs.address, *efs_host_key]))
        host.pid = local_vm.boot(root, local_tree.OsTree(local_tree.CACHE).base_image, host.namespace, host.name,
                                 Path(host.state_dir) / "boot.log")

    def _start_sshd(self, host: Host, authorized_key: str, export: Path | None = None) -> None:
        make_namespace(host, self.bridge, self.network.prefixlen)
        start_sshd(host, authorized_key, export)

    def _ensure_bridge(self) -> None:
        if run("ip", "link", "show", self.bridge, check=False).returncode != 0:
            run("ip", "link", "add", self.bridge, "type", "bridge")
            run("ip", "addr", "add", f"{self.gateway}/{self.network.prefixlen}", "dev", self.bridge)
        run("ip", "link", "set", self.bridge, "up")
        self._accept_bridge_traffic()

    # Docker on this machine sets the FORWARD policy to DROP and makes bridged packets pass
    # through iptables (br_netfilter): the hosts could then reach this machine but not each
    # other. One rule of ours, on our bridge only, lets them; nothing else of the firewall changes.
    def _bridge_rule(self) -> list[str]:
        return ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT",
                "-m", "comment", "--comment", f"dcgan local cluster {self.network}"]

    def _accept_bridge_traffic(self) -> None:
        if IPTABLES and run(IPTABLES, "-C", *self._bridge_rule(), check=False).returncode != 0:
            run(IPTABLES, "-I", *self._bridge_rule())

    def _new_host(self, address: str, kind: str) -> Host:
        last = address.split(".")[-1]
        name = f"{'efs' if kind == 'efs' else 'node'}-{self.tag}-{last}"
        return Host(name, f"dcgan-{self.tag}-{last}", address, f"dcg{self.tag}-{last}"[:15], 0,
                    str(self.state_dir / name), kind)

    def _write_hosts_files(self, hosts: list[Host]) -> None:
        """Every host resolves every host; its own name maps to its own address.

        Written in place: `ip netns exec` bind-mounts the file by inode.
        """
        lines = ["127.0.0.1 localhost"] + [f"{h.address} {h.name}" for h in hosts if h.namespace]
        for host in hosts:
            if not host.namespace:
                continue
            path = (Path(host.state_dir) / "root/etc/hosts" if host.kind == "vm"
                    else Path("/etc/netns") / host.namespace / "hosts")
            with open(path, "w") as hosts_file:
                hosts_file.write("\n".join(lines) + "\n")

    # -- destroy -----------------------------------------------------------
    def destroy(self, names: list[str] | None = None) -> list[Host]:
        """Remove the named hosts (all when None); unknown names are already gone. The EFS stand-in
        and the proxy go with the last vm node."""
        with self._locked() as hosts:
            doomed = [h for h in hosts if names is None or h.name in names]
            if not any(h.kind == "vm" for h in hosts if h not in doomed):
                doomed += [h for h in hosts if h.kind in ("efs", "proxy") and h not in doomed]
            for host in doomed:
                self._destroy_host(host)
                hosts.remove(host)
            if hosts:
                self._write_hosts_files(hosts)
            else:
                self._remove_bridge()
            if any(h.kind == "vm" for h in doomed):
                local_vm.release_nspawn_state()
        return [h for h in doomed if h.kind not in ("efs", "proxy")]

    def _destroy_host(self, host: Host) -> None:
        if host.kind == "vm":
            local_vm.stop(host.pid, host.name, Path(host.state_dir) / "root", pid_alive)
        # Killing `unshare` SIGKILLs its child (--kill-child), PID 1 of the host's PID
        # namespace, and the kernel then ends every process of that namespace:
        # sessions, jobs, all. SIGKILL because unshare ignores SIGTERM while it waits.
        if host.pid and pid_alive(host.pid):
            os.kill(host.pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_DEADLINE_S
            while pid_alive(host.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        with suppress(ChildProcessError):
            os.waitpid(host.pid, os.WNOHANG)  # reap it when we are its parent
        remove_namespace(host)
        shutil.rmtree(host.state_dir, ignore_errors=True)

    def _remove_bridge(self) -> None:
        if run("ip", "link", "show", self.bridge, check=False).returncode == 0:
            run("ip", "link", "del", self.bridge)
        while IPTABLES and run(IPTABLES, "-D", *self._bridge_rule(), check=False).returncode == 0:
            pass  # every copy: a crash between -C and -I of two commands at once may have left two


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="where the host records live")
    parser.add_argument("--subnet", default=DEFAULT_SUBNET, help="test subnet (default %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="start new hosts")
    create.add_argument("count", type=int)
    create.add_argument("--key", type=Path, required=True, help="public key allowed to log in")
    create.add_argument("--kind", choices=("netns", "vm"), default="netns", help="kind of host (default %(default)s)")
    sub.add_parser("destroy", help="remove every host of the state folder")
    sub.add_parser("list", help="print the hosts as JSON")
    args = parser.parse_args(argv)

    cluster = LocalHosts(args.state_dir, args.subnet)
    try:
        if args.command == "create":
            hosts = cluster.create(args.count, args.key.read_text(), args.kind)
        elif args.command == "destroy":
            hosts = cluster.destroy()
        else:
            hosts = cluster.hosts()
    except LocalHostError as error:
        raise SystemExit(f"error: {error}") from None
    print(json.dumps([asdict(h) for h in hosts], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
