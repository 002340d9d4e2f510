"""The course's own path, played for real: EC2 starts the instances and each is a cloud-like local
node (a whole Debian with its own apt, users and Docker); the EFS stand-in mounted by the role's own
EFS tasks; the app's image built on every node; ranks in containers. Through `make` and CLAP with
PROVIDER=aws, as the course's students type it.

EC2 is the emulator (moto) on this machine's 127.0.0.1, handing out addresses of a VPC subnet equal to
this module's own subnet, where it gives no public address. Beside it, a watcher plays EC2's
hypervisor: for each instance the emulator runs, it boots a cloud-like node (local_vm: user `ubuntu`
with the key pair's public key) at the instance's private address, and removes it when the instance
is terminated. Nothing connects to an address the emulator hands out unless a node of ours holds it:
the watcher makes a node only at an address of this subnet, and a probe launch checks that the
emulator hands out no other. The shared filesystem is the EFS stand-in of the cloud-like nodes (SFTP;
this kernel has no NFS client), which the user's settings name as a filesystem that is not EFS:
EFS_HOST, EFS_FSTYPE, EFS_MOUNT_OPTIONS. The nodes have no cloud-init, so the launch's user data
(their shutdown after MAX_HOURS) never runs on them; setup's own shutdown task schedules it anyway.

The tests of this module run in order on one cluster (its setup costs minutes); each says what a
user would check after that step. The local provider's flavor of the same nodes
(INSTANCE_TYPE=type-local-vm, the same role on the same kind of node) is checked last, on a subnet of
its own: its nodes come up whole with their EFS stand-in and go leaving nothing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
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
from test_aws_steps import EC2, GROUP, client_side, instances, prepare_aws

# One cluster for the whole module, its tests in order: on one pytest-xdist worker, handed out first.
pytestmark = [pytest.mark.xdist_group("cloud_path"), pytest.mark.long]
THIRD = 248  # the EC2 cluster's subnet: subnet(THIRD)
LOCAL_VM_THIRD = 247  # the local provider's cloud-like nodes
LOCK_HELD_S = 20
POLL_S = 1.0  # how often the hypervisor asks EC2 what runs


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
    return emulator.python_json(EC2.format(endpoint=emulator.endpoint) + f"""
vpc = ec2.create_vpc(CidrBlock="{cidr}")["Vpc"]["VpcId"]
gid = ec2.create_security_group(GroupName="{GROUP}", Description="nodes", VpcId=vpc)["GroupId"]
ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[{{"IpProtocol": "-1",
    "UserIdGroupPairs": [{{"GroupId": gid}}]}}])
print(json.dumps(ec2.create_subnet(VpcId=vpc, CidrBlock="{cidr}")["Subnet"]["SubnetId"]))
""")


def probe_addresses(emulator: Ec2Emulator, subnet_id: str) -> list[str]:
    """The addresses the emulator gives an instance of the subnet (launched and terminated at once)."""
    return emulator.python_json(EC2.format(endpoint=emulator.endpoint) + f"""
i = ec2.run_instances(ImageId="ami-12c6146b", InstanceType="t2.medium", MinCount=1, MaxCount=1,
                      SubnetId="{subnet_id}")["Instances"][0]
ec2.terminate_instances(InstanceIds=[i["InstanceId"]])
print(json.dumps([a for a in (i.get("PrivateIpAddress"), i.get("PublicIpAddress")) if a]))
""")


def need_cloud_like_nodes() -> None:
    need_root()
    if local_tree.needs():
        pytest.skip(f"cloud-like nodes need {', '.join(local_tree.needs())} (.ci/run installs them)")


Cloud = tuple[Ec2Emulator, dict, Hypervisor]  # the emulator, the checkout's environment, the hypervisor


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    """The emulator on loopback, its subnet ours, the hypervisor beside it, and the user's checkout
    (PROVIDER=aws) with its template in that subnet and the EFS stand-in as its shared filesystem;
    `make up` done. Whatever a test leaves is ended by `make down` and the hypervisor's records."""
    need_cloud_like_nodes()
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
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
            done = make((emulator, env, hypervisor), "up")
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
            yield emulator, env, hypervisor
        finally:
            make((emulator, env, hypervisor), "down")
            hypervisor.stop()


def make(cloud: Cloud, *targets: str, **extra: str) -> subprocess.CompletedProcess:
    emulator, env, _ = cloud
    return emulator.run(["make", "-s", "-C", str(ROOT), *targets], extra_env={**client_side(env), **extra},
                        timeout=1800)


def state(cloud: Cloud) -> dict:
    return json.loads(Path(cloud[1]["NODES_FILE"]).read_text())


def as_ubuntu(key: Path, address: str, command: str) -> list[str]:
    """The command line that runs `command` as a node's login user (ubuntu), with that key."""
    return ["ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "LogLevel=ERROR", "-o", "ControlPath=none", f"ubuntu@{address}", command]


def ssh(cloud: Cloud, rank: int, command: str) -> list[str]:
    """`command` as the login user of the cluster's node of that rank, with the key pair's key."""
    return as_ubuntu(Path(cloud[1]["CLAP_PATH"]) / "private" / "key.pem", state(cloud)["nodes"][rank]["address"],
                     command)


def on_node(cloud: Cloud, rank: int, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(ssh(cloud, rank, command), capture_output=True, text=True, timeout=timeout)


def export(cloud: Cloud) -> Path:
    """The EFS stand-in's folder on this machine."""
    return cloud[2].hosts.efs_export


def setup_recap(cloud: Cloud) -> str:
    """The PLAY RECAP lines of the newest setup log."""
    log = max((Path(cloud[1]["CLAP_PATH"]) / "storage" / "logs").glob("setup-*.log"))
    return "\n".join(line for line in log.read_text().splitlines() if re.search(r" : ok=\d+ +changed=", line))


@pytest.mark.parametrize("at", ["10.9.9.9", "gateway"])
def test_a_host_asked_at_an_address_not_free_in_the_subnet_is_refused(tmp_path: Path, ssh_key: Path, at: str) -> None:
    need_root()
    hosts = LocalHosts(tmp_path, subnet(THIRD))
    at = hosts.gateway if at == "gateway" else at
    with pytest.raises(LocalHostError, match=f"{at} is not one free address of LOCAL_SUBNET={subnet(THIRD)}"):
        hosts.create(1, ssh_key.with_suffix(".pub").read_text(), at=at)
    assert hosts.hosts() == [] and leftovers(subnet_tag(THIRD)) == []


def test_up_starts_instances_each_played_by_a_node_at_its_private_address(cloud: Cloud) -> None:
    emulator, _, hypervisor = cloud
    assert hypervisor.errors == []
    ours = [i for i in instances(emulator) if i["tags"].get("ClapProject") == "dcgan-clap"]
    assert len(ours) == 2 and sorted(hypervisor.booted) == sorted(i["id"] for i in ours)
    addresses = sorted(node["address"] for node in state(cloud)["nodes"])
    assert addresses == sorted(hypervisor.booted.values())
    assert all(ipaddress.ip_address(a) in hypervisor.hosts.network for a in addresses)


def test_setup_on_fresh_nodes_installs_mounts_builds_and_waits_for_dpkg(cloud: Cloud) -> None:
    """apt, the docker group, the EFS mount and the image build, on fresh nodes; one of them has its
    dpkg lock held (as unattended-upgrades holds it on a fresh EC2 Ubuntu): setup waits for it."""
    export(cloud).mkdir(mode=0o755, parents=True, exist_ok=True)
    export(cloud).chmod(0o751)  # the EFS root's mode is its owner's: setup must leave it
    # A fresh apt cache, so that the install itself, not the cache update, meets the held lock.
    assert on_node(cloud, 1, "sudo apt-get update -qq").returncode == 0
    hold = (f"import fcntl, time; f = open('/var/lib/dpkg/lock-frontend', 'w'); fcntl.lockf(f, fcntl.LOCK_EX); "
            f"print('held', flush=True); time.sleep({LOCK_HELD_S})")
    holder = subprocess.Popen(ssh(cloud, 1, f'sudo python3 -c "{hold}"'), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        released = time.time() + LOCK_HELD_S
        done = make(cloud, "setup")
    finally:
        holder.wait(timeout=LOCK_HELD_S + 30)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # dpkg installed docker.io on that node only once the lock was free: it waited, it did not fail.
    installed = on_node(cloud, 1, "grep -m1 ' install docker.io' /var/log/dpkg.log | cut -c1-19").stdout.strip()
    assert time.mktime(time.strptime(installed, "%Y-%m-%d %H:%M:%S")) - time.timezone >= int(released) - 2
    for rank in (0, 1):
        checks = on_node(cloud, rank, "dpkg-query -W -f '${Status}\\n' docker.io sshfs; id -nG; "
                                   "grep -q ' /home/ubuntu/efs fuse.sshfs ' /proc/mounts && echo mounted; "
                                   "grep -c ' fuse.sshfs ' /etc/fstab; "
                                   "test -f /run/systemd/shutdown/scheduled && echo capped; "  # MAX_HOURS
                                   "docker image ls dcgan --format '{{.Tag}}'")  # as ubuntu: the group works
        assert checks.returncode == 0, checks.stderr
        lines = checks.stdout.splitlines()
        assert lines[:2] == ["install ok installed"] * 2
        assert "docker" in lines[2].split()
        assert lines[3:6] == ["mounted", "1", "capped"]
        assert "latest" in lines[6:] and len(lines[6:]) == 2  # dcgan:latest and dcgan:<hash of the app>
    assert export(cloud).stat().st_mode & 0o777 == 0o751
    writable = on_node(cloud, 0, "touch /home/ubuntu/efs/dcgan/.probe && rm /home/ubuntu/efs/dcgan/.probe")
    assert writable.returncode == 0, writable.stderr  # the login user's folder on the shared filesystem


def test_second_setup_changes_nothing_and_builds_nothing(cloud: Cloud) -> None:
    done = make(cloud, "setup")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    recap = setup_recap(cloud)
    assert recap.count("changed=0") == 2, recap
    assert export(cloud).stat().st_mode & 0o777 == 0o751


def test_mount_comes_back_from_fstab_as_at_boot(cloud: Cloud) -> None:
    back = on_node(cloud, 1, "sudo umount /home/ubuntu/efs && sudo mount -a && "
                          "grep -q ' /home/ubuntu/efs fuse.sshfs ' /proc/mounts && "
                          "ls /home/ubuntu/efs/dcgan/Distributed-DCGAN/dist_dcgan.py")
    assert back.returncode == 0, back.stderr


def test_run_trains_in_containers_and_leaves_none(cloud: Cloud) -> None:
    done = make(cloud, "run")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = state(cloud)["runs"][-1]
    run_dir = export(cloud) / "dcgan" / "runs" / run["id"]
    for rank in (0, 1):
        assert f"[rank: {rank}] Epoch 1 took:" in (run_dir / f"output-{rank}.txt").read_text()
        command = json.loads((run_dir / f".rank-{rank}.json").read_text())["command"][-1]
        assert command.startswith(f"docker run --rm --name dcgan-{run['id']}-{rank} --network=host ")
        assert on_node(cloud, rank, "docker ps -aq").stdout == ""


def test_killed_rank_fails_the_run_and_no_container_is_left(cloud: Cloud) -> None:
    emulator, env, _ = cloud
    started = subprocess.Popen(["make", "-s", "-C", str(ROOT), "run"],
                               env={**emulator.env, **client_side(env), "EPOCHS": "200"},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        container = ""
        while time.monotonic() < deadline and not container:
            time.sleep(2)
            runs = state(cloud).get("runs", [])
            if runs and runs[-1]["state"] == "running":
                found = on_node(cloud, 1, f"docker ps -q --filter name=dcgan-{runs[-1]['id']}-1").stdout.strip()
                log = export(cloud) / "dcgan" / "runs" / runs[-1]["id"] / "output-1.txt"
                container = found if log.exists() and "[iteration: 1/" in log.read_text() else ""
        assert container, "rank 1 never trained"
        assert on_node(cloud, 1, f"docker kill {container}").returncode == 0
        killed = time.monotonic()
        out, _ = started.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        if started.poll() is None:
            os.killpg(started.pid, signal.SIGKILL)
            started.wait()
    assert started.returncode != 0 and "rank 1" in out, out[-2000:]
    assert took < 30, f"the run took {took:.0f} s to fail after the kill"
    assert state(cloud)["runs"][-1]["state"] == "failed"
    for rank in (0, 1):
        assert on_node(cloud, rank, "docker ps -aq").stdout == ""


def test_results_come_home(cloud: Cloud) -> None:
    done = make(cloud, "results")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for run in state(cloud)["runs"]:
        assert (Path(cloud[1]["RESULTS_DIR"]) / run["id"] / "output-0.txt").is_file()


def test_down_terminates_the_instances_and_leaves_nothing(cloud: Cloud) -> None:
    emulator, env, hypervisor = cloud
    done = make(cloud, "down")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ours = [i for i in instances(emulator, ("terminated",)) if i["tags"].get("ClapProject") == "dcgan-clap"]
    assert len(ours) == 2 and sorted(hypervisor.booted) == sorted(i["id"] for i in ours)
    status = make(cloud, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.startswith("no cluster:") and "RUNNING" not in status.stdout, status.stdout
    # Terminated instances took their nodes with them: the last one the EFS stand-in and the proxy.
    deadline = time.monotonic() + 60
    while hypervisor.hosts.hosts() and time.monotonic() < deadline:
        time.sleep(1)
    assert hypervisor.hosts.hosts() == [] and hypervisor.errors == []
    assert_nothing_left(hypervisor.hosts, THIRD, hypervisor.pids)
    assert (export(cloud) / "dcgan").is_dir()  # the stand-in's files outlive it, as an EFS does


def assert_nothing_left(hosts: LocalHosts, third: int, pids: set[int]) -> None:
    """No namespace, link, node process, disk mount, node tree, cgroup or firewall rule of that subnet."""
    assert leftovers(subnet_tag(third)) == []
    assert not [pid for pid in pids if pid_alive(pid)]  # nodes, EFS stand-in, proxy (a zombie is gone)
    assert str(hosts.state_dir) not in Path("/proc/mounts").read_text()  # the nodes' disks
    assert not [path.name for path in hosts.state_dir.iterdir() if subnet_tag(third) in path.name]
    # only this subnet's nodes: another session's cluster on this machine has its own
    cgroups = subprocess.run(["find", "/sys/fs/cgroup", "-maxdepth", "4", "-name", f"dcgan-node-{subnet_tag(third)}-*"],
                             capture_output=True, text=True).stdout
    assert cgroups == ""
    rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    assert subnet(third) not in rules


def test_local_vm_nodes_come_up_whole_with_their_efs_and_go_leaving_nothing(tmp_path: Path) -> None:
    """INSTANCE_TYPE=type-local-vm: the local provider starts the same nodes itself, with the EFS
    stand-in and the proxy, and records how the role mounts the stand-in; `make down` ends them all."""
    need_cloud_like_nodes()
    env = project_env(tmp_path)
    env.update({"CLAP": str(clap_checkout()), "INSTANCE_TYPE": "type-local-vm", "LOCAL_SUBNET": subnet(LOCAL_VM_THIRD)})
    del env["EFS_MOUNT_POINT"]  # the nodes' own default, /home/ubuntu/efs, as on AWS
    local = LocalHosts(Path(env["CLAP_PATH"]) / "storage" / "local", subnet(LOCAL_VM_THIRD))
    try:
        up = local_make(env, "up")
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        recorded = json.loads(Path(env["NODES_FILE"]).read_text())
        nodes, efs = recorded["nodes"], local.efs_host()
        assert len(nodes) == 2 and efs.address not in {node["address"] for node in nodes}
        # what setup gives the role: the stand-in, mounted over SFTP as the provider's settings say
        assert recorded["efs"] == {"efs_host": efs.address, "efs_source": f"root@{efs.address}:/",
                                   **local_vm.EFS_MOUNT}
        for node in nodes:  # each a whole OS of its own, reached as ubuntu with the cluster's key
            whole = subprocess.run(as_ubuntu(Path(env["CLAP_PATH"]) / "private" / "local_key", node["address"],
                                             "ps -p 1 -o comm=; sudo -n apt-get --version | head -1; hostname -I"),
                                   capture_output=True, text=True, timeout=60)
            assert whole.returncode == 0, whole.stderr
            init, apt, addresses = whole.stdout.splitlines()
            assert init == "systemd" and apt.startswith("apt ") and node["address"] in addresses.split()
        pids = {host.pid for host in local.hosts()}
        down = local_make(env, "down")
        assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-3000:]
        assert_nothing_left(local, LOCAL_VM_THIRD, pids)
    finally:
        local_make(env, "down")  # whatever a failed assertion left


def local_make(env: dict, *targets: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), *targets], env=env, capture_output=True, text=True,
                          timeout=900)
