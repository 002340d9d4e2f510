"""`PROVIDER=aws make all` end to end, on the EC2 emulator whose instances are cloud-like local nodes.

The emulator (moto) listens on this machine's 127.0.0.1 and hands out addresses of a VPC subnet
equal to this test's own subnet, where it gives no public address. Beside it, a watcher plays
EC2's hypervisor: for each instance the emulator runs, it boots a cloud-like node (local_vm: a
whole Debian, user `ubuntu` with the key pair's public key) at the instance's private address,
and removes it when the instance is terminated. Nothing connects to an address the emulator hands
out unless a node of ours holds it: the watcher makes a node only at an address of this subnet,
and a probe launch checks that the emulator hands out no other.

The shared filesystem is the EFS stand-in of the cloud-like nodes (SFTP; this kernel has no NFS
client), which the user's settings name as a filesystem that is not EFS: EFS_HOST, EFS_FSTYPE,
EFS_MOUNT_OPTIONS. The nodes have no cloud-init, so the launch's user data (their shutdown after
MAX_HOURS) never runs on them; setup's own shutdown task schedules it anyway, as on EC2.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

import config
import local_efs
import local_tree
import local_vm
from conftest import ROOT, clap_checkout, leftovers, need_root, project_env, subnet, subnet_tag
from ec2_emulator import Ec2Emulator, ec2_emulator
from local_hosts import LocalHosts
from local_netns import LocalHostError, pid_alive
from test_aws_steps import GROUP, client_side, instances, prepare_aws

pytestmark = [pytest.mark.xdist_group("aws_e2e"), pytest.mark.long]
THIRD = 0  # this module's test subnet: subnet(THIRD)
POLL_S = 0.5


class Hypervisor(threading.Thread):
    """Boots a cloud-like node at the private address of each instance the emulator runs, and removes
    it when the instance is terminated; records what it did and what went wrong."""

    def __init__(self, endpoint: str, hosts: LocalHosts, public_key: str) -> None:
        super().__init__(daemon=True)
        self.ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                                aws_secret_access_key="x")
        self.hosts, self.public_key = hosts, public_key
        self.nodes: dict[str, str] = {}  # instance id -> node name
        self.booted: dict[str, str] = {}  # every instance id that had a node -> its address
        self.pids: set[int] = set()  # of every node, EFS stand-in and proxy made
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(POLL_S):
            try:
                self._follow()
            except Exception as error:  # noqa: BLE001  the test reports it; the watch goes on
                self.errors.append(f"{type(error).__name__}: {error}")

    def _follow(self) -> None:
        for reservation in self.ec2.describe_instances()["Reservations"]:
            for instance in reservation["Instances"]:
                iid, state = instance["InstanceId"], instance["State"]["Name"]
                if state == "running" and iid not in self.nodes and iid not in self.booted:
                    address = instance.get("PrivateIpAddress", "")
                    if ipaddress.ip_address(address) not in self.hosts.network or instance.get("PublicIpAddress"):
                        self.errors.append(f"{iid} got {address} / {instance.get('PublicIpAddress')}: "
                                           f"not only an address of {self.hosts.network}; no node made")
                        self.booted[iid] = ""
                        continue
                    self.booted[iid] = address  # once: a node that fails to boot is an error, not retried
                    self.nodes[iid] = self.hosts.create(1, self.public_key, kind="vm", at=address)[0].name
                    self.pids |= {made.pid for made in self.hosts.hosts()}
                elif state in ("shutting-down", "terminated") and iid in self.nodes:
                    self.hosts.destroy([self.nodes.pop(iid)])

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=120)
        self.hosts.destroy()  # whatever a failed test left: removed by its records


def seed_subnet(emulator: Ec2Emulator, cidr: str) -> str:
    """A VPC and subnet equal to the test subnet, with the nodes' security group of that VPC (a launch
    in the subnet names it by id); returns the subnet's id."""
    return emulator.python_json(f"""
import boto3, json
ec2 = boto3.client("ec2", endpoint_url="{emulator.endpoint}", region_name="us-east-1",
                   aws_access_key_id="x", aws_secret_access_key="x")
vpc = ec2.create_vpc(CidrBlock="{cidr}")["Vpc"]["VpcId"]
gid = ec2.create_security_group(GroupName="{GROUP}", Description="nodes", VpcId=vpc)["GroupId"]
ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[{{"IpProtocol": "-1",
    "UserIdGroupPairs": [{{"GroupId": gid}}]}}])
print(json.dumps(ec2.create_subnet(VpcId=vpc, CidrBlock="{cidr}")["Subnet"]["SubnetId"]))
""")


def probe_addresses(emulator: Ec2Emulator, subnet_id: str) -> list[str]:
    """The addresses the emulator gives an instance of the subnet (launched and terminated at once)."""
    return emulator.python_json(f"""
import boto3, json
ec2 = boto3.client("ec2", endpoint_url="{emulator.endpoint}", region_name="us-east-1",
                   aws_access_key_id="x", aws_secret_access_key="x")
i = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="t2.medium", MinCount=1, MaxCount=1,
                      SubnetId="{subnet_id}")["Instances"][0]
ec2.terminate_instances(InstanceIds=[i["InstanceId"]])
print(json.dumps([a for a in (i.get("PrivateIpAddress"), i.get("PublicIpAddress")) if a]))
""")


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Ec2Emulator, dict, Hypervisor]]:
    """The emulator on loopback, its subnet ours, the hypervisor beside it, and the user's checkout
    (PROVIDER=aws) with its template in that subnet and the EFS stand-in as its shared filesystem."""
    need_root()
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    if local_tree.needs():
        pytest.skip(f"cloud-like nodes need {', '.join(local_tree.needs())} (.ci/run installs them)")
    # The cloud's side: its hosts' records, the EFS stand-in's folder, with the demo app and data on it.
    side = project_env(tmp_path_factory.mktemp("cloud"))
    side.update({"INSTANCE_TYPE": "type-local-vm", "LOCAL_SUBNET": subnet(THIRD)})
    del side["EFS_MOUNT_POINT"]  # the nodes' own, /home/ubuntu/efs
    settings = config.load_settings(side)
    hosts = LocalHosts(settings.local_dir, subnet(THIRD))
    local_efs.stage(settings)  # what the course puts on its EFS: the app in dcgan/Distributed-DCGAN, the data
    with ec2_emulator(isolated=False) as emulator:
        user_dir = tmp_path_factory.mktemp("user")
        env = prepare_aws(project_env(user_dir), emulator, user_dir)
        del env["EFS_MOUNT_POINT"]  # the AWS default, /home/ubuntu/efs
        subnet_id = seed_subnet(emulator, subnet(THIRD))
        probed = probe_addresses(emulator, subnet_id)
        assert len(probed) == 1 and ipaddress.ip_address(probed[0]) in hosts.network, probed
        instances_file = Path(env["CLAP_PATH"]) / "configs" / "instances.yaml"
        instances_file.write_text(instances_file.read_text().replace(
            "  flavor: t2.medium\n", f"  flavor: t2.medium\n  network_ids: [{subnet_id}]\n"))
        efs = hosts.network.broadcast_address - 1  # where the stand-in starts, out of the instances' way
        env.update({"CLAP": str(clap_checkout()), "EFS_HOST": f"root@{efs}", "EFS_FSTYPE": "fuse.sshfs",
                    "EFS_MOUNT_OPTIONS": local_vm.EFS_MOUNT["efs_mount_options"], "CONNECTION_TRIES": "3",
                    "BOOT_TIMEOUT": "300", "LOCAL_SUBNET": subnet(THIRD)})
        public_key = (Path(env["CLAP_PATH"]) / "private" / "key.pub").read_text()
        hypervisor = Hypervisor(emulator.endpoint, hosts, public_key)
        hypervisor.start()
        try:
            yield emulator, env, hypervisor
        finally:
            hypervisor.stop()


def make(emulator: Ec2Emulator, env: dict, *targets: str) -> subprocess.CompletedProcess:
    return emulator.run(["make", "-s", "-C", str(ROOT), *targets], extra_env=client_side(env), timeout=2400)


@pytest.mark.parametrize("at", ["10.9.9.9", "gateway"])
def test_a_host_asked_at_an_address_not_free_in_the_subnet_is_refused(tmp_path: Path, ssh_key: Path, at: str) -> None:
    need_root()
    hosts = LocalHosts(tmp_path, subnet(THIRD))
    at = hosts.gateway if at == "gateway" else at
    with pytest.raises(LocalHostError, match=f"{at} is not one free address of LOCAL_SUBNET={subnet(THIRD)}"):
        hosts.create(1, ssh_key.with_suffix(".pub").read_text(), at=at)
    assert hosts.hosts() == [] and leftovers(subnet_tag(THIRD)) == []


def test_make_all_on_instances_that_are_cloud_like_nodes(cloud: tuple[Ec2Emulator, dict, Hypervisor]) -> None:
    emulator, env, hypervisor = cloud
    done = make(emulator, env, "all")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert hypervisor.errors == []

    # Two instances of this cluster, each played by a node at its private address, both terminated.
    ours = [i for i in instances(emulator, ("terminated",)) if i["tags"].get("ClapProject") == "dcgan-clap"]
    assert len(ours) == 2 and sorted(hypervisor.booted) == sorted(i["id"] for i in ours)
    assert all(ipaddress.ip_address(a) in hypervisor.hosts.network for a in hypervisor.booted.values())

    # The run trained in Docker on both nodes and wrote to the shared filesystem (the stand-in, over sshfs),
    # and its results came home.
    export = hypervisor.hosts.efs_export
    runs = sorted((export / "dcgan" / "runs").iterdir())
    assert len(runs) == 1
    for rank in (0, 1):
        assert f"[rank: {rank}] Epoch 1 took:" in (runs[0] / f"output-{rank}.txt").read_text()
        command = json.loads((runs[0] / f".rank-{rank}.json").read_text())["command"][-1]
        assert command.startswith(f"docker run --rm --name dcgan-{runs[0].name}-{rank} --network=host ")
        assert (Path(env["RESULTS_DIR"]) / runs[0].name / f"output-{rank}.txt").is_file()


def test_status_afterwards_shows_nothing_and_nothing_is_left(cloud: tuple[Ec2Emulator, dict, Hypervisor]) -> None:
    emulator, env, hypervisor = cloud
    status = make(emulator, env, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.startswith("no cluster:") and "RUNNING" not in status.stdout, status.stdout
    # Terminated instances took their nodes with them: the last one the EFS stand-in and the proxy.
    deadline = time.monotonic() + 60
    while hypervisor.hosts.hosts() and time.monotonic() < deadline:
        time.sleep(1)
    assert hypervisor.hosts.hosts() == []
    assert leftovers(subnet_tag(THIRD)) == []
    local = hypervisor.hosts.state_dir
    assert str(local) not in Path("/proc/mounts").read_text()  # the nodes' disks
    assert not [path.name for path in local.iterdir() if subnet_tag(THIRD) in path.name]
    cgroups = subprocess.run(["find", "/sys/fs/cgroup", "-maxdepth", "4", "-name", f"dcgan-node-{subnet_tag(THIRD)}-*"],
                             capture_output=True, text=True).stdout
    assert cgroups == ""
    rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    assert subnet(THIRD) not in rules
    assert not [pid for pid in hypervisor.pids if pid_alive(pid)]

