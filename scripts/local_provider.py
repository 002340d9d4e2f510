"""CLAP provider `local`: nodes that are hosts on this machine, or your own SSH hosts.

Registered into CLAP's NodeManager by cluster.clap() (CLAP itself is unchanged). The
instance template's `flavor` says where a node comes from:
  netns  a new network-namespace host made by local_hosts.py (the embedded default);
  vm     a new cloud-like node (local_hosts.py, local_vm.py): its own Debian, users, apt and
         Docker; each carries in `extra["efs"]` how the role mounts the cluster's EFS stand-in;
  ssh    the next address of SSH_HOSTS, machines you already have: never created
         or removed here, only handed to CLAP.
"""

from __future__ import annotations

import copy
import subprocess
import time
import uuid
from pathlib import Path

from clap.abstract_provider import AbstractInstanceProvider, InstanceDeploymentError
from clap.configs import InstanceInfo
from clap.node import NodeDescriptor, NodeStatus, NodeType

import local_vm
from local_hosts import Host, LocalHostError, LocalHosts

MADE_HERE = ("netns", "vm")  # the flavors whose hosts this provider makes and removes


class LocalProvider(AbstractInstanceProvider):
    provider = "local"

    def __init__(self, hosts: LocalHosts, private_dir: Path, known_hosts: Path,
                 ssh_hosts: list[str], tags: dict[str, str]) -> None:
        self.hosts = hosts
        self.private_dir = private_dir
        self.known_hosts = known_hosts
        self.ssh_hosts = ssh_hosts
        self.tags = tags  # project and cluster id, so a lost nodes.json can't hide a node

    def start_instances(self, instance: InstanceInfo, count: int, timeout: int = 600) -> list[NodeDescriptor]:
        flavor = instance.instance.flavor
        if flavor in MADE_HERE:
            key = self.private_dir / instance.login.keypair_public_file
            try:
                made = self.hosts.create(count, key.read_text(), kind=flavor)
            except LocalHostError as error:
                raise InstanceDeploymentError(str(error)) from None
            self._trust([(h.address, self._host_key(h)) for h in made])
            efs = self._efs_mount() if flavor == "vm" else {}
            places = [(h.name, h.address, {"namespace": h.namespace, "host_pid": h.pid, **efs}) for h in made]
        elif flavor == "ssh":
            if count > len(self.ssh_hosts):
                raise InstanceDeploymentError(
                    f"SSH_HOSTS lists {len(self.ssh_hosts)} hosts but {count} nodes were asked for.")
            places = [(address, address, {}) for address in self.ssh_hosts[:count]]
        else:
            raise InstanceDeploymentError(f"unknown flavor '{flavor}' for the local provider: use netns, vm or ssh.")
        now = time.time()
        return [
            NodeDescriptor(
                node_id=uuid.uuid4().hex, configuration=instance, nickname=name, ip=address,
                type=NodeType.TYPE_LOCAL, cloud_instance_id=name, status=NodeStatus.STARTED,
                creation_time=now, update_time=now, tags=dict(self.tags),
                extra={"private_ip": address, "flavor": flavor, **extra},
            )
            for name, address, extra in places
        ]

    def stop_instances(self, nodes_to_stop: list[NodeDescriptor], timeout: int = 600) -> list[NodeDescriptor]:
        made_here = [n for n in nodes_to_stop if n.extra.get("flavor") in MADE_HERE]
        self.hosts.destroy([n.cloud_instance_id for n in made_here])
        self._forget([n.ip for n in made_here])
        stopped = []
        for node in nodes_to_stop:
            node = copy.deepcopy(node)
            node.status = NodeStatus.STOPPED
            stopped.append(node)
        return stopped

    def update_instance_info(self, nodes_to_check: list[NodeDescriptor], timeout: int = 600) -> list[NodeDescriptor]:
        up = {h.name for h in self.hosts.hosts() if self.hosts.is_up(h)}
        checked = []
        for node in nodes_to_check:
            node = copy.deepcopy(node)
            if node.extra.get("flavor") in MADE_HERE:
                node.status = NodeStatus.STARTED if node.cloud_instance_id in up else NodeStatus.STOPPED
            elif node.status not in (NodeStatus.REACHABLE, NodeStatus.UNREACHABLE):
                node.status = NodeStatus.STARTED  # an SSH host is up until SSH says otherwise
            checked.append(node)
        return checked

    def pause_instances(self, nodes_to_pause: list[NodeDescriptor], timeout: int = 600) -> list[NodeDescriptor]:
        raise InstanceDeploymentError("local nodes cannot be paused: stop them with `make down`.")

    def resume_instances(self, nodes_to_resume: list[NodeDescriptor], timeout: int = 600) -> list[NodeDescriptor]:
        raise InstanceDeploymentError("local nodes cannot be paused or resumed.")

    def _efs_mount(self) -> dict:
        """How the role mounts the EFS stand-in: its address, and sshfs in place of NFS."""
        efs = self.hosts.efs_host()
        return {"efs": {"efs_host": efs.address, "efs_source": f"root@{efs.address}:/", **local_vm.EFS_MOUNT}}

    @staticmethod
    def _host_key(host: Host) -> Path:
        """The host key sshd shows: a netns host's own, or the one the vm node made at its first boot."""
        return Path(host.state_dir) / ("root/etc/ssh" if host.kind == "vm" else "") / "ssh_host_ed25519_key.pub"

    # Host keys of the hosts we made are known, so SSH can check them strictly; an
    # address reused by a later host gets its new key.
    def _trust(self, keys: list[tuple[str, Path]]) -> None:
        self._forget([address for address, _ in keys])
        self.known_hosts.parent.mkdir(parents=True, exist_ok=True)
        with open(self.known_hosts, "a") as known:
            for address, key in keys:
                known.write(f"{address} {' '.join(key.read_text().split()[:2])}\n")

    def _forget(self, addresses: list[str]) -> None:
        if not self.known_hosts.exists():
            return
        for address in addresses:
            subprocess.run(["ssh-keygen", "-R", address, "-f", str(self.known_hosts)],
                           capture_output=True, check=False)
