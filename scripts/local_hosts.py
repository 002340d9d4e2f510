"""Real hosts on this machine: one network namespace, address and sshd each.

A host is what a cloud VM is to CLAP: an address that answers SSH with a key.
Each lives in its own network namespace (own interface and address on one test
subnet, no default route, so no packet leaves the machine), with its own host
name (UTS namespace) and /etc/hosts (bind-mounted by `ip netns exec` from
/etc/netns/<ns>/, never the machine's own). Its sshd runs as PID 1 of a PID
namespace of its own, so ending that one process ends every session and job on
the host: nothing outlives `destroy`. The machine's filesystem is shared by all
hosts and plays the role of the cloud's shared EFS.

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
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_SUBNET = "10.213.0.0/24"
SSHD = shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin:/bin") or "/usr/sbin/sshd"
START_DEADLINE_S = 10.0
STOP_DEADLINE_S = 5.0


class LocalHostError(RuntimeError):
    """A host could not be made or removed; the message says what to do."""


@dataclass
class Host:
    name: str  # host name inside the host, also the netns suffix
    namespace: str
    address: str
    veth: str  # the machine-side end of the host's link
    pid: int  # `unshare` in front of the host's PID namespace (sshd is its PID 1)
    state_dir: str

    @property
    def ssh_port(self) -> int:
        return 22


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def _pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


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
        return _pid_alive(host.pid) and Path(f"/run/netns/{host.namespace}").exists()

    # -- create ------------------------------------------------------------
    def create(self, count: int, authorized_key: str) -> list[Host]:
        """Start `count` new hosts that accept `authorized_key` for root."""
        if os.geteuid() != 0:
            raise LocalHostError("the local cluster needs root (network namespaces): run as root, e.g. sudo make up.")
        if not Path(SSHD).exists():
            raise LocalHostError("sshd is not installed: apt-get install openssh-server.")
        made: list[Host] = []
        with self._locked() as hosts:
            try:
                self._ensure_bridge()
                taken = {h.address for h in hosts}
                free = (str(a) for a in self.network.hosts() if str(a) != self.gateway and str(a) not in taken)
                for _ in range(count):
                    address = next(free, None)
                    if address is None:
                        raise LocalHostError(f"no free address left in LOCAL_SUBNET={self.network}.")
                    host = self._new_host(address)
                    made.append(host)  # before any of it exists: a Ctrl-C half-way is cleaned up too
                    self._start_host(host, authorized_key)
                    hosts.append(host)
                self._write_hosts_files(hosts)
                for host in made:
                    self._wait_for_ssh(host)
            except BaseException:
                # Ctrl-C or a failure half-way: take down what this call made, nothing else.
                for host in made:
                    self._destroy_host(host)
                    if host in hosts:
                        hosts.remove(host)
                if not hosts:
                    self._remove_bridge()
                raise
        return made

    def _ensure_bridge(self) -> None:
        if _run("ip", "link", "show", self.bridge, check=False).returncode != 0:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{self.gateway}/{self.network.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")

    def _new_host(self, address: str) -> Host:
        last = address.split(".")[-1]
        name = f"node-{self.tag}-{last}"
        return Host(name, f"dcgan-{self.tag}-{last}", address, f"dcg{self.tag}-{last}"[:15], 0,
                    str(self.state_dir / name))

    def _start_host(self, host: Host, authorized_key: str) -> None:
        namespace, address, veth, name = host.namespace, host.address, host.veth, host.name
        host_dir = Path(host.state_dir)
        self._remove_leftovers(host)
        host_dir.mkdir(parents=True, exist_ok=True)

        _run("ip", "netns", "add", namespace)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _run("ip", "link", "set", veth, "master", self.bridge, "up")
        in_ns = ("ip", "netns", "exec", namespace)
        _run(*in_ns, "ip", "link", "set", "lo", "up")
        _run(*in_ns, "ip", "addr", "add", f"{address}/{self.network.prefixlen}", "dev", "eth0")
        _run(*in_ns, "ip", "link", "set", "eth0", "up")

        # An empty resolv.conf makes every DNS lookup fail at once instead of timing out.
        netns_etc = Path("/etc/netns") / namespace
        netns_etc.mkdir(parents=True, exist_ok=True)
        (netns_etc / "resolv.conf").write_text("")
        (netns_etc / "hosts").write_text("")

        key = host_dir / "ssh_host_ed25519_key"
        if not key.exists():
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
        (host_dir / "authorized_keys").write_text(authorized_key.strip() + "\n")
        (host_dir / "sshd_config").write_text(_sshd_config(address, host_dir))
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        with open(host_dir / "sshd.log", "ab") as log:
            host.pid = subprocess.Popen(
                [*in_ns, "unshare", "--uts", "--pid", "--mount-proc", "--kill-child", "--",
                 "sh", "-c", f'hostname "$0" && exec {SSHD} -D -e -f "$1"', name, str(host_dir / "sshd_config")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # not ended by the Ctrl-C of the command that made it
            ).pid

    def _write_hosts_files(self, hosts: list[Host]) -> None:
        """Every host resolves every host; its own name maps to its own address.

        Written in place: `ip netns exec` bind-mounts the file by inode.
        """
        lines = ["127.0.0.1 localhost"] + [f"{h.address} {h.name}" for h in hosts]
        for host in hosts:
            with open(Path("/etc/netns") / host.namespace / "hosts", "w") as hosts_file:
                hosts_file.write("\n".join(lines) + "\n")

    def _wait_for_ssh(self, host: Host) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < deadline:
            if not _pid_alive(host.pid):
                log = (Path(host.state_dir) / "sshd.log").read_text(errors="replace").strip()
                raise LocalHostError(f"sshd of {host.name} exited at start: {log[-300:]}")
            try:
                with socket.create_connection((host.address, host.ssh_port), timeout=0.5) as conn:
                    if conn.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.05)
        raise LocalHostError(
            f"sshd of {host.name} did not answer on {host.address}:22 within {START_DEADLINE_S:.0f} s.")

    # -- destroy -----------------------------------------------------------
    def destroy(self, names: list[str] | None = None) -> list[Host]:
        """Remove the named hosts (all when None); unknown names are already gone."""
        with self._locked() as hosts:
            doomed = [h for h in hosts if names is None or h.name in names]
            for host in doomed:
                self._destroy_host(host)
                hosts.remove(host)
            if hosts:
                self._write_hosts_files(hosts)
            else:
                self._remove_bridge()
        return doomed

    def _destroy_host(self, host: Host) -> None:
        # Killing `unshare` SIGKILLs its child (--kill-child), PID 1 of the host's PID
        # namespace, and the kernel then ends every process of that namespace:
        # sessions, jobs, all. SIGKILL because unshare ignores SIGTERM while it waits.
        if host.pid and _pid_alive(host.pid):
            os.kill(host.pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_DEADLINE_S
            while _pid_alive(host.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        with suppress(ChildProcessError):
            os.waitpid(host.pid, os.WNOHANG)  # reap it when we are its parent
        self._remove_leftovers(host)
        shutil.rmtree(host.state_dir, ignore_errors=True)

    def _remove_leftovers(self, host: Host) -> None:
        """Delete the veth, the namespace and its /etc/netns files, if they exist."""
        # First, by its end on this side (which takes its peer along): left to the kernel, the veth
        # goes only when the namespace's cleanup ends, seconds later once TCP has run in it.
        _run("ip", "link", "del", host.veth, check=False)  # fails harmlessly when it is gone already
        if Path(f"/run/netns/{host.namespace}").exists():
            _run("ip", "netns", "del", host.namespace)
        shutil.rmtree(Path("/etc/netns") / host.namespace, ignore_errors=True)

    def _remove_bridge(self) -> None:
        if _run("ip", "link", "show", self.bridge, check=False).returncode == 0:
            _run("ip", "link", "del", self.bridge)


def _sshd_config(address: str, host_dir: Path) -> str:
    return f"""\
ListenAddress {address}
Port 22
HostKey {host_dir}/ssh_host_ed25519_key
AuthorizedKeysFile {host_dir}/authorized_keys
PidFile none
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
StrictModes no
MaxSessions 100
MaxStartups 100:30:200
Subsystem sftp internal-sftp
PrintMotd no
# bash reads ~/.bashrc before a command sent over SSH, unless it is not the first shell. The
# hosts share this machine's home folders, whose .bashrc is the operator's (pyenv init, say: a
# sixth of a second per session), not a node's: their sessions skip it.
SetEnv SHLVL=1
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, required=True, help="where the host records live")
    parser.add_argument("--subnet", default=DEFAULT_SUBNET, help="test subnet (default %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="start new hosts")
    create.add_argument("count", type=int)
    create.add_argument("--key", type=Path, required=True, help="public key allowed to log in as root")
    sub.add_parser("destroy", help="remove every host of the state folder")
    sub.add_parser("list", help="print the hosts as JSON")
    args = parser.parse_args(argv)

    cluster = LocalHosts(args.state_dir, args.subnet)
    try:
        if args.command == "create":
            hosts = cluster.create(args.count, args.key.read_text())
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
