"""One host of the local cluster, as this machine makes it: a network namespace with a link into
the cluster's bridge, an address, its own resolver files and, for netns hosts, an sshd that is
PID 1 of the host's own PID namespace (so ending that one process ends every session and job on
the host). local_hosts.py keeps the records and the cluster's bridge; local_vm.py boots a whole
OS in such a namespace instead of an sshd.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
SSHD = shutil.which("sshd", path=SBIN) or "/usr/sbin/sshd"
EXPORT_ROOT = "/mnt"  # where the EFS stand-in sees its export folder (in its own mount namespace)
START_DEADLINE_S = 10.0
BOOT_DEADLINE_S = 60.0  # a vm node boots a whole OS: 1.4 s here, idle; much more on a loaded machine


class LocalHostError(RuntimeError):
    """A host could not be made or removed; the message says what to do."""


@dataclass
class Host:
    name: str  # host name inside the host, also the netns suffix
    namespace: str
    address: str
    veth: str  # the machine-side end of the host's link
    pid: int  # `unshare` in front of the host's PID namespace (sshd, or the node's nspawn, its PID 1)
    state_dir: str
    kind: str = "netns"  # netns, vm, efs or proxy (see local_hosts.py)

    @property
    def ssh_port(self) -> int:
        return 22


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def pid_alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not yet reaped) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def make_namespace(host: Host, bridge: str, prefixlen: int) -> None:
    """The host's network namespace, its link into the bridge, its address, and its resolver files."""
    namespace, address, veth = host.namespace, host.address, host.veth
    remove_namespace(host)
    Path(host.state_dir).mkdir(parents=True, exist_ok=True)

    run("ip", "netns", "add", namespace)
    run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
    run("ip", "link", "set", veth, "master", bridge, "up")
    in_ns = ("ip", "netns", "exec", namespace)
    run(*in_ns, "ip", "link", "set", "lo", "up")
    run(*in_ns, "ip", "addr", "add", f"{address}/{prefixlen}", "dev", "eth0")
    run(*in_ns, "ip", "link", "set", "eth0", "up")

    # An empty resolv.conf makes every DNS lookup fail at once instead of timing out.
    netns_etc = Path("/etc/netns") / namespace
    netns_etc.mkdir(parents=True, exist_ok=True)
    (netns_etc / "resolv.conf").write_text("")
    (netns_etc / "hosts").write_text("")

def start_sshd(host: Host, authorized_key: str, export: Path | None = None) -> None:
    """A netns host: an sshd as PID 1 of the host's own PID namespace. With `export`, the host
    serves that folder, and only it, as the root of its SFTP (the EFS stand-in)."""
    host_dir = Path(host.state_dir)
    in_ns = ("ip", "netns", "exec", host.namespace)
    key = host_dir / "ssh_host_ed25519_key"
    if not key.exists():
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key))
    (host_dir / "authorized_keys").write_text(authorized_key.strip() + "\n")
    (host_dir / "sshd_config").write_text(sshd_config(host.address, host_dir, serve_only=export is not None))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    with open(host_dir / "sshd.log", "ab") as log:
        host.pid = subprocess.Popen(
            [*in_ns, "unshare", "--uts", "--pid", "--mount-proc", "--kill-child", "--",
             # The export is bound on EXPORT_ROOT in the host's own mount namespace (--mount-proc makes
             # one): sshd chroots only where every folder up from it is root's and not writable to
             # others, which a state folder under /tmp is not.
             "sh", "-c", f'hostname "$0" && {{ [ -z "$2" ] || mount --bind "$2" {EXPORT_ROOT}; }} && '
                         f'exec {SSHD} -D -e -f "$1"',
             host.name, str(host_dir / "sshd_config"), str(export or "")],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True,  # not ended by the Ctrl-C of the command that made it
        ).pid


def wait_for_ssh(host: Host) -> None:
    bound = BOOT_DEADLINE_S if host.kind == "vm" else START_DEADLINE_S
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if not pid_alive(host.pid):
            log = Path(host.state_dir) / ("boot.log" if host.kind == "vm" else "sshd.log")
            said = log.read_text(errors="replace").strip() if log.exists() else "no output"
            raise LocalHostError(f"{'the node' if host.kind == 'vm' else 'sshd'} of {host.name} exited at "
                                 f"start: {said[-300:]}")
        try:
            with socket.create_connection((host.address, host.ssh_port), timeout=0.5) as conn:
                if conn.recv(4).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.05)
    raise LocalHostError(
        f"sshd of {host.name} did not answer on {host.address}:22 within {bound:.0f} s.")


def remove_namespace(host: Host) -> None:
    """Delete the veth, the namespace and its /etc/netns files, if they exist."""
    # First, by its end on this side (which takes its peer along): left to the kernel, the veth
    # goes only when the namespace's cleanup ends, seconds later once TCP has run in it.
    if host.veth:
        run("ip", "link", "del", host.veth, check=False)  # fails harmlessly when it is gone already
    if host.namespace and Path(f"/run/netns/{host.namespace}").exists():
        run("ip", "netns", "del", host.namespace)
    if host.namespace:
        shutil.rmtree(Path("/etc/netns") / host.namespace, ignore_errors=True)


def sshd_config(address: str, host_dir: Path, serve_only: bool = False) -> str:
    # The EFS stand-in serves its export folder and nothing else: SFTP only, chrooted there.
    sftp_only = f"ChrootDirectory {EXPORT_ROOT}\nForceCommand internal-sftp\nAllowTcpForwarding no\n"
    return (sftp_only if serve_only else "") + f"""\
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
