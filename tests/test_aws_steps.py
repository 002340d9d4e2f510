"""`make check/up/status/down` with PROVIDER=aws against the EC2 emulator.

Every command runs inside a network namespace that has only loopback, where the
emulator listens, so nothing can leave the machine. The emulator's instances have
fake public addresses: CONNECTION_TRIES=0 and no role action, so none is contacted; where a
test needs a node that never answers SSH, the SSH wait is replaced by one that hears from none.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, clap_checkout, need_root, project_env
from ec2_emulator import UBUNTU_LTS_AMI, UBUNTU_LTS_PARAMETER, Ec2Emulator, ec2_emulator

KEYPAIR = "dcgan-test-key"
GROUP = "open-security-group"

# One worker runs them all: they share the module's emulator, which takes seconds to start.
pytestmark = pytest.mark.xdist_group("aws_steps")


@pytest.fixture
def aws_env(project: dict, emulator: Ec2Emulator, tmp_path: Path) -> dict:
    """The project's own clap_config, with keys, on the emulator; its key pair and group exist there."""
    return prepare_aws(project, emulator, tmp_path)


def prepare_aws(project: dict, emulator: Ec2Emulator, tmp_path: Path) -> dict:
    private = Path(project["CLAP_PATH"]) / "private"
    (private / "ec2_access_key.pub").write_text("AKIAEXAMPLEEXAMPLE00\n")
    (private / "ec2_access_key.pem").write_text("example-secret-key\n")
    (private / "ec2_access_key.pem").chmod(0o600)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(private / "key.pem")], check=True)
    (private / "key.pem.pub").rename(private / "key.pub")
    public_key = (private / "key.pub").read_text().strip()
    emulator.python_json(f"""
import boto3, json
ec2 = boto3.client("ec2", endpoint_url="{emulator.endpoint}", region_name="us-east-1",
                   aws_access_key_id="x", aws_secret_access_key="x")
if not ec2.describe_key_pairs(Filters=[{{"Name": "key-name", "Values": ["{KEYPAIR}"]}}])["KeyPairs"]:
    ec2.import_key_pair(KeyName="{KEYPAIR}", PublicKeyMaterial="{public_key}".encode())
if not ec2.describe_security_groups(Filters=[{{"Name": "group-name", "Values": ["{GROUP}"]}}])["SecurityGroups"]:
    gid = ec2.create_security_group(GroupName="{GROUP}", Description="nodes")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[{{"IpProtocol": "-1",
        "UserIdGroupPairs": [{{"GroupId": gid}}]}}])
print(json.dumps(True))
""")
    return {**project, "PROVIDER": "aws", "KEYPAIR_NAME": KEYPAIR, "EFS_HOST": "fs-emulated.efs",
            "CONNECTION_TRIES": "0", "HOME": str(tmp_path)}


def make(emulator: Ec2Emulator, env: dict, *targets: str) -> subprocess.CompletedProcess:
    return emulator.run(["make", "-s", "-C", str(ROOT), *targets], extra_env=client_side(env), timeout=600)


def client_side(env: dict) -> dict:
    """A project's environment without AWS_ variables, so that the emulator's own (its endpoint) win;
    `make` runs the steps in the venv of this Python (CI runs these tests on a second one too)."""
    return {**{k: v for k, v in env.items() if not k.startswith("AWS_")}, "VENV": sys.prefix}


def in_process(emulator: Ec2Emulator, env: dict, step: str, before: str, timeout: float = 600) -> \
        subprocess.CompletedProcess:
    """Run a step's main() in a Python that first runs `before` (e.g. a patch), as `make <step>` would."""
    return emulator.python(f"""
import sys
sys.path.insert(0, {str(ROOT / "scripts")!r})
import aws_nodes, cluster, cluster_state, config, output, {step}
{before}
output.main_guard({step}.main)
""", extra_env=client_side(env), timeout=timeout)


EC2 = """
import boto3, json
ec2 = boto3.client("ec2", endpoint_url="{endpoint}", region_name="us-east-1",
                   aws_access_key_id="x", aws_secret_access_key="x")
"""


def instances(emulator: Ec2Emulator, states: tuple[str, ...] = ("pending", "running")) -> list[dict]:
    return emulator.python_json(EC2.format(endpoint=emulator.endpoint) + f"""
import base64
found = [i for r in ec2.describe_instances(Filters=[{{"Name": "instance-state-name",
         "Values": {list(states)}}}])["Reservations"] for i in r["Instances"]]
def attribute(i, name, key):
    return ec2.describe_instance_attribute(InstanceId=i["InstanceId"], Attribute=name)[key].get("Value", "")
def volumes(i):
    return ec2.describe_volumes(Filters=[{{"Name": "attachment.instance-id", "Values": [i["InstanceId"]]}}])["Volumes"]
print(json.dumps([{{"id": i["InstanceId"], "type": i["InstanceType"], "image": i["ImageId"],
                   "key": i.get("KeyName"), "lifecycle": i.get("InstanceLifecycle", "normal"),
                   "shutdown": attribute(i, "instanceInitiatedShutdownBehavior", "InstanceInitiatedShutdownBehavior"),
                   "user_data": base64.b64decode(attribute(i, "userData", "UserData")).decode(),
                   "disks": [[v["Size"], v["VolumeType"]] for v in volumes(i)],
                   "tags": {{t["Key"]: t["Value"] for t in i.get("Tags", [])}}}}
                  for i in found]))
""")


def terminate(emulator: Ec2Emulator, ids: list[str]) -> None:
    if ids:
        emulator.python_json(EC2.format(endpoint=emulator.endpoint)
                             + f"ec2.terminate_instances(InstanceIds={ids!r}); print(json.dumps(True))")


BAD_KEYS = [
    ("ec2_access_key.pub", "", "ec2_access_key.pub is missing or empty: put your AWS access key id in it"),
    ("ec2_access_key.pem", None, "ec2_access_key.pem is missing or empty: put your AWS secret access key in it"),
    ("ec2_access_key.pem", "chmod", "ec2_access_key.pem is readable by others (mode 0644): chmod 600"),
    ("key.pem", "chmod", "key.pem is readable by others (mode 0644): chmod 600"),
    ("key.pub", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7ZwOJ3tNw9Yb2lPpaQ4XbUucL6f9aF0j1qwmZ9bD1C other",
     "key.pub does not match"),
    ("key.pem", "garbage", "is not a private key ssh can read"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_KEYS, ids=[f"{n}-{m[:20]}" for n, _, m in BAD_KEYS])
def test_check_rejects_each_bad_key(aws_env: dict, emulator: Ec2Emulator, name: str, content: str | None,
                                    message: str) -> None:
    path = Path(aws_env["CLAP_PATH"]) / "private" / name
    if content is None:
        path.unlink()
    elif content == "chmod":
        path.chmod(0o644)
    else:
        path.write_text(content)
    done = make(emulator, aws_env, "check")
    assert done.returncode != 0
    assert message in done.stderr
    assert instances(emulator) == [] or not any(  # nothing of this project was started
        i["tags"].get("ClapProject") for i in instances(emulator))


@pytest.mark.parametrize(("setting", "message"), [
    ({"KEYPAIR_NAME": ""}, "KEYPAIR_NAME is empty: set it in .env"),
    ({"KEYPAIR_NAME": "no-such-key-pair"}, "KEYPAIR_NAME=no-such-key-pair: EC2 has no key pair of that name in "
                                           "us-east-1: import key.pub there"),
    ({"EFS_HOST": ""}, "EFS_HOST is empty: set it in .env"),
    ({"MAX_HOURS": "0"}, "MAX_HOURS='0' must be a number of hours above 0"),
])
def test_check_rejects_missing_settings(aws_env: dict, emulator: Ec2Emulator, setting: dict, message: str) -> None:
    done = make(emulator, {**aws_env, **setting}, "check")
    assert done.returncode != 0 and message in done.stderr


def test_check_passes_with_good_keys_and_asks_ec2(aws_env: dict, emulator: Ec2Emulator) -> None:
    (Path(aws_env["CLAP_PATH"]) / "private" / "key.pem").chmod(0o400)  # as the EC2 console's advice leaves it
    done = make(emulator, aws_env, "check")
    assert done.returncode == 0, done.stderr
    assert "ready: 2 x type-t2.medium on aws, runner docker" in done.stdout
    assert instances(emulator) == []  # the launch was a DryRun
    assert not Path(aws_env["NODES_FILE"]).with_name(".owner").exists()  # nothing written either


def test_up_status_down_tags_and_terminates(aws_env: dict, emulator: Ec2Emulator) -> None:
    aws_env["CLAP"] = str(clap_checkout())
    up = make(emulator, {**aws_env, "MAX_HOURS": "2"}, "up")
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    assert "expected cost: $0.0928 per hour (on-demand)" in up.stdout  # 2 x t2.medium, clap_config/prices.yaml
    assert_one_voice(up)
    state = json.loads(Path(aws_env["NODES_FILE"]).read_text())
    owner = Path(aws_env["NODES_FILE"]).with_name(".owner").read_text().strip()
    assert owner.startswith("o-") and owner not in json.dumps(state)  # beside nodes.json, not in it
    ours = [i for i in instances(emulator) if i["tags"].get("ClapClusterId") == state["cluster_id"]]
    assert len(ours) == 2
    secret = "example-secret-key"
    assert secret not in up.stdout + up.stderr and secret not in Path(aws_env["NODES_FILE"]).read_text()
    for instance in ours:
        assert instance["type"] == "t2.medium" and instance["key"] == KEYPAIR and instance["lifecycle"] == "normal"
        assert instance["image"] == UBUNTU_LTS_AMI  # Canonical's current Ubuntu LTS, from its SSM parameter
        assert instance["tags"]["ClapProject"] == "dcgan-clap" and instance["tags"]["ClapOwner"] == owner
        assert instance["shutdown"] == "terminate"
        assert instance["disks"] == [[40, "gp3"]]  # room for the CUDA torch image
        # the lifetime cap rides in the launch: the node counts down to MAX_HOURS after `up` began
        assert f"{int(state['created'] + 2 * 3600)} - $(date +%s)" in instance["user_data"]
        assert 'shutdown -h "+$minutes"' in instance["user_data"]
    assert sorted(node["cloud_id"] for node in state["nodes"]) == sorted(i["id"] for i in ours)

    status = make(emulator, aws_env, "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(" alive") == 2 and "cost so far about $" in status.stdout
    assert "RUNNING" not in status.stdout and "other checkouts'" not in status.stdout

    # EC2 recycles public addresses: a node's key must not outlive it, or the next one is refused.
    known_hosts = Path(aws_env["CLAP_PATH"]) / "storage" / "known_hosts"
    key = (Path(aws_env["CLAP_PATH"]) / "private" / "key.pub").read_text().split()[:2]
    addresses = [node["address"] for node in state["nodes"]]
    known_hosts.write_text("".join(f"{host} {' '.join(key)}\n" for host in [*addresses, "192.0.2.7"]))

    down = make(emulator, aws_env, "down")
    assert down.returncode == 0, down.stderr
    assert_one_voice(down)
    assert not Path(aws_env["NODES_FILE"]).exists()
    assert known_hosts.read_text().split("\n")[0].startswith("192.0.2.7 ")  # another host's key stays
    assert not any(address in known_hosts.read_text() for address in addresses)
    assert [i for i in instances(emulator) if i["tags"].get("ClapClusterId") == state["cluster_id"]] == []
    assert {i["id"] for i in ours} <= {i["id"] for i in instances(emulator, ("terminated",))}


def assert_one_voice(done: subprocess.CompletedProcess) -> None:
    """No Ansible play starts or stops EC2 nodes any more, and nothing speaks but the step."""
    screen = done.stdout + done.stderr
    assert "PLAY [" not in screen and "TASK [" not in screen and "Traceback" not in screen, screen


def test_the_user_data_schedules_the_nodes_own_shutdown(tmp_path: Path) -> None:
    """The script cloud-init runs at first boot, run here with `shutdown` and `date` stood in for."""
    import aws_launch

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "shutdown").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'asked'}\n")
    (bin_dir / "date").write_text("#!/bin/sh\necho 1000000\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    for ends_at, minutes in ((1000000 + 90 * 60 + 59, "+90"), (1000000 - 5, "+1")):  # the end has passed: now
        script = tmp_path / "user-data"
        script.write_text(aws_launch.user_data(ends_at))
        subprocess.run(["sh", str(script)], env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, check=True)
        assert (tmp_path / "asked").read_text().split() == ["-h", minutes]


def test_spot_nodes_are_started_and_costed_at_the_spot_price(aws_env: dict, emulator: Ec2Emulator) -> None:
    aws_env["CLAP"] = str(clap_checkout())
    up = make(emulator, {**aws_env, "MARKET": "spot", "SPOT_MAX_PRICE": "0.04", "NODES": "1"}, "up")
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
        # the emulator's spot price is $0.00001 an hour, far from t2.medium's on-demand $0.0464
        assert "expected cost: $0.0000 per hour (spot)" in up.stdout
        cluster = json.loads(Path(aws_env["NODES_FILE"]).read_text())["cluster_id"]
        ours = [i for i in instances(emulator) if i["tags"].get("ClapClusterId") == cluster]
        assert [i["lifecycle"] for i in ours] == ["spot"] and ours[0]["shutdown"] == "terminate"
        status = make(emulator, {**aws_env, "MARKET": "spot"}, "status")
        assert "($0.0000/hour)" in status.stdout, status.stdout
    finally:
        assert make(emulator, aws_env, "down").returncode == 0


def test_the_spot_request_asks_for_the_max_price(project: dict) -> None:
    import aws_launch
    import config

    settings = config.load_settings({**project, "PROVIDER": "aws", "MARKET": "spot", "SPOT_MAX_PRICE": "0.04"})
    launch = aws_launch.launch_for(settings, {"cluster_id": "c-1", "created": 0.0}, "o-" + "0" * 16)
    template = {"flavor": "t2.medium", "security_group": GROUP, "boot_disk_size": 40}
    request = aws_launch.run_request(launch, template, KEYPAIR, {"ImageId": "ami-1", "RootDeviceName": "/dev/sda1"}, 2,
                                     {})
    assert request["InstanceMarketOptions"] == {"MarketType": "spot", "SpotOptions": {
        "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate", "MaxPrice": "0.04"}}
    on_demand = config.load_settings({**project, "PROVIDER": "aws"})
    launch = aws_launch.launch_for(on_demand, {"cluster_id": "c-1", "created": 0.0}, "o-" + "0" * 16)
    assert "InstanceMarketOptions" not in aws_launch.run_request(launch, template, KEYPAIR, {"ImageId": "ami-1",
                                                                 "RootDeviceName": "/dev/sda1"}, 2, {})


def test_the_template_network_ids_is_the_subnet_the_nodes_start_in(project: dict) -> None:
    import aws
    import aws_launch
    import config

    settings = config.load_settings({**project, "PROVIDER": "aws"})
    launch = aws_launch.launch_for(settings, {"cluster_id": "c-1", "created": 0.0}, "o-" + "0" * 16)
    image = {"ImageId": "ami-1", "RootDeviceName": "/dev/sda1"}
    template = {"flavor": "t2.medium", "security_group": GROUP}
    assert "SubnetId" not in aws_launch.run_request(launch, template, KEYPAIR, image, 2, {})  # the default VPC's
    request = aws_launch.run_request(launch, {**template, "network_ids": ["subnet-1"]}, KEYPAIR, image, 2, {})
    assert request["SubnetId"] == "subnet-1"
    with pytest.raises(aws.AwsError, match=r"the instances.yaml template of t2.medium lists 2 network_ids "
                                           r"\(subnet-1, subnet-2\): name the one subnet its nodes start in."):
        aws_launch.run_request(launch, {**template, "network_ids": ["subnet-1", "subnet-2"]}, KEYPAIR, image, 2, {})


def test_a_refused_launch_is_one_sentence_and_boto_is_never_imported(aws_env: dict, emulator: Ec2Emulator) -> None:
    """EC2 refuses RunInstances itself (the key pair went away after `make check` looked)."""
    aws_env["CLAP"] = str(clap_checkout())
    up = in_process(emulator, {**aws_env, "KEYPAIR_NAME": "no-such-key-pair"}, "up", """
import atexit, checks
checks.preflight = lambda settings: None
atexit.register(lambda: print("boto modules:", sorted(m for m in sys.modules if m.split(".")[0] == "boto")))
""")
    assert up.returncode != 0
    lines = [line for line in up.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in up.stdout + up.stderr, up.stderr
    assert lines[0].startswith("error: EC2 RunInstances was refused (InvalidKeyPair.NotFound"), lines[0]
    assert lines[0].endswith("; nothing was started."), lines[0]
    assert instances(emulator) == []
    assert json.loads(Path(aws_env["NODES_FILE"]).read_text())["steps"]["up"]["state"] == "failed"
    assert "boto modules: []" in up.stdout  # boto3 only: no boto (boto2) anywhere on the way


def test_orphans_are_found_by_tag_when_every_record_is_lost(aws_env: dict, emulator: Ec2Emulator) -> None:
    aws_env["CLAP"] = str(clap_checkout())
    assert make(emulator, aws_env, "up").returncode == 0
    cluster = json.loads(Path(aws_env["NODES_FILE"]).read_text())["cluster_id"]
    Path(aws_env["NODES_FILE"]).unlink()
    (Path(aws_env["CLAP_PATH"]) / "storage" / "nodes.db").unlink()

    status = make(emulator, aws_env, "status")
    assert status.returncode != 0  # something runs that no record names: not a clean state
    assert "RUNNING, not in nodes.json: i-" in status.stdout and f"(cluster {cluster})" in status.stdout
    assert "`make down` stops them" in status.stdout

    down = make(emulator, aws_env, "down")
    assert down.returncode == 0, down.stderr
    assert [i for i in instances(emulator) if i["tags"].get("ClapClusterId") == cluster] == []


def test_an_up_killed_right_after_run_instances_leaves_nothing_untagged(aws_env: dict, emulator: Ec2Emulator) -> None:
    """SIGKILL the moment EC2 has the instances: they carry every tag and their cap already, and
    `make down` finds and stops them though no record names them."""
    aws_env["CLAP"] = str(clap_checkout())
    up = in_process(emulator, aws_env, "up", """
import os, signal, aws
aws.wait_running = lambda *args: os.kill(os.getpid(), signal.SIGKILL)
""")
    assert up.returncode == -signal.SIGKILL
    state = json.loads(Path(aws_env["NODES_FILE"]).read_text())
    assert state["nodes"] == []  # nothing recorded...
    owner = Path(aws_env["NODES_FILE"]).with_name(".owner").read_text().strip()
    started = [i for i in instances(emulator) if i["key"] == KEYPAIR]
    assert len(started) == 2
    for instance in started:  # ...and still nothing untagged or uncapped
        assert instance["tags"]["ClapClusterId"] == state["cluster_id"] and instance["tags"]["ClapOwner"] == owner
        assert instance["shutdown"] == "terminate" and "shutdown -h" in instance["user_data"]

    status = make(emulator, aws_env, "status")
    assert "RUNNING, not in nodes.json:" in status.stdout and status.returncode != 0
    down = make(emulator, aws_env, "down")
    assert down.returncode == 0, down.stderr
    assert instances(emulator) == []


def test_two_checkouts_in_one_account_each_stop_only_their_own(aws_env: dict, emulator: Ec2Emulator,
                                                               tmp_path: Path) -> None:
    """A course's shared account: a classmate's cluster is listed by `status`, never stopped by `down`,
    with nodes.json or without it."""
    mine = {**aws_env, "CLAP": str(clap_checkout()), "NODES": "1"}
    (tmp_path / "classmate").mkdir()
    theirs = {**prepare_aws(project_env(tmp_path / "classmate"), emulator, tmp_path / "classmate"),
              "CLAP": mine["CLAP"], "NODES": "1"}
    try:
        assert make(emulator, mine, "up").returncode == 0
        assert make(emulator, theirs, "up").returncode == 0
        their_cluster = json.loads(Path(theirs["NODES_FILE"]).read_text())["cluster_id"]
        their_ids = [i["id"] for i in instances(emulator) if i["tags"]["ClapClusterId"] == their_cluster]

        status = make(emulator, mine, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"other checkouts' instances of this project (not touched): {their_ids[0]} (cluster {their_cluster})" \
            in status.stdout
        assert make(emulator, mine, "down").returncode == 0
        assert [i["id"] for i in instances(emulator)] == their_ids
        again = make(emulator, mine, "down")  # no nodes.json now: every instance of this checkout, and only those
        assert again.returncode == 0 and "nothing running: already down." in again.stdout
        assert [i["id"] for i in instances(emulator)] == their_ids
        assert make(emulator, mine, "status").returncode == 0
    finally:
        assert make(emulator, theirs, "down").returncode == 0
    assert instances(emulator) == []


def test_a_node_ec2_no_longer_knows_is_gone_not_a_traceback(aws_env: dict, emulator: Ec2Emulator) -> None:
    """Terminated instances vanish from EC2 after about an hour (InvalidInstanceID.NotFound)."""
    aws_env["CLAP"] = str(clap_checkout())
    assert make(emulator, {**aws_env, "NODES": "1"}, "up").returncode == 0
    vanished = "i-0123456789abcdef0"
    forget = in_process(emulator, aws_env, "status", f"""
import json
settings = config.load_settings()
state = cluster_state.read_state(settings)
node = cluster.clap(settings, state).node_manager.get_nodes_by_id(cluster_state.node_ids(state))[0]
node.cloud_instance_id = state["nodes"][0]["cloud_id"] = {vanished!r}
cluster.clap(settings, state).node_manager.upsert_node(node)
cluster_state.write_state(settings, state)
""")
    assert forget.returncode == 1, forget.stderr  # status ran after the change: the node is gone
    assert "GONE" in forget.stdout and "Traceback" not in forget.stderr, forget.stdout + forget.stderr
    up = make(emulator, {**aws_env, "NODES": "1"}, "up")
    assert up.returncode != 0 and "Traceback" not in up.stderr
    assert "lists nodes that are gone" in up.stderr and "run `make down`" in up.stderr
    down = make(emulator, aws_env, "down")
    assert down.returncode == 0, down.stderr
    assert instances(emulator) == []  # the real instance too: it carries the cluster's tags


def test_check_rejects_a_missing_security_group(aws_env: dict, emulator: Ec2Emulator) -> None:
    instances_file = Path(aws_env["CLAP_PATH"]) / "configs" / "instances.yaml"
    instances_file.write_text(instances_file.read_text().replace(f"security_group: {GROUP}",
                                                                 "security_group: no-such-group"))
    done = make(emulator, aws_env, "check")
    assert done.returncode != 0
    assert "error: security group no-such-group (INSTANCE_TYPE=type-t2.medium in" in done.stderr
    assert "does not exist in us-east-1" in done.stderr


def test_check_rejects_a_group_closed_to_its_members(aws_env: dict, emulator: Ec2Emulator) -> None:
    """gloo opens random ports between the nodes: without all TCP among them the run fails after setup."""
    group_id = emulator.python_json(EC2.format(endpoint=emulator.endpoint) + """
gid = ec2.create_security_group(GroupName="ssh-only", Description="ssh only")["GroupId"]
ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[{"IpProtocol": "tcp", "FromPort": 22,
    "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
print(json.dumps(gid))
""")
    instances_file = Path(aws_env["CLAP_PATH"]) / "configs" / "instances.yaml"
    instances_file.write_text(instances_file.read_text().replace(f"security_group: {GROUP}",
                                                                 "security_group: ssh-only"))
    done = make(emulator, aws_env, "check")
    assert done.returncode != 0
    assert (f"error: security group ssh-only ({group_id}) does not let its members reach each other on every TCP "
            f"port, which the training (gloo) needs: add an inbound rule to it: type All TCP, source {group_id} "
            f"(the group itself).") in done.stderr


def test_check_rejects_an_image_the_region_lacks(aws_env: dict, emulator: Ec2Emulator) -> None:
    instances_file = Path(aws_env["CLAP_PATH"]) / "configs" / "instances.yaml"
    text = instances_file.read_text()
    ssm = f"image_id: resolve:ssm:{UBUNTU_LTS_PARAMETER}"
    assert ssm in text
    instances_file.write_text(text.replace(ssm, "image_id: ami-0000000000000dead"))  # a template's image_id wins
    done = make(emulator, aws_env, "check")
    assert done.returncode != 0
    assert "error: the AMI ami-0000000000000dead (image_id ami-0000000000000dead) does not exist in us-east-1" \
        in done.stderr
    instances_file.write_text(text.replace(ssm, "image_id: resolve:ssm:/no/such/parameter"))
    done = make(emulator, aws_env, "check")
    assert done.returncode != 0 and "the SSM parameter /no/such/parameter does not exist in us-east-1" in done.stderr


def test_up_terminates_nodes_that_never_answer_ssh(aws_env: dict, emulator: Ec2Emulator) -> None:
    aws_env["CLAP"] = str(clap_checkout())
    up = in_process(emulator, {**aws_env, "CONNECTION_TRIES": "1", "BOOT_TIMEOUT": "10"}, "up", """
aws_nodes.wait_for_ssh = lambda settings, handles, state, ids: list(ids)  # BOOT_TIMEOUT passed, none answered
""")
    state = json.loads(Path(aws_env["NODES_FILE"]).read_text())
    try:
        assert up.returncode != 0
        assert "did not answer SSH within BOOT_TIMEOUT=10 s and were terminated; run `make up` again." \
            in up.stderr, up.stderr
        assert state["nodes"] == [] and state["steps"]["up"]["state"] == "failed"
        assert [i for i in instances(emulator) if i["tags"].get("ClapClusterId") == state["cluster_id"]] == []
    finally:
        down = make(emulator, aws_env, "down")
        assert down.returncode == 0, down.stderr


GRANTS = ["ec2:Describe*", "ssm:GetParameter", "ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances"]


@pytest.mark.parametrize("denied", ["ec2:DescribeKeyPairs", "ec2:RunInstances", "ec2:CreateTags",
                                    "ec2:TerminateInstances"])
def test_an_ec2_refusal_is_one_sentence(project: dict, tmp_path: Path, denied: str) -> None:
    """IAM that allows all that `make check` asks but one call: `make check` says which call to grant,
    with no traceback. moto checks IAM only once auth is on (a private emulator)."""
    need_root()
    allowed = ["ec2:DescribeRegions"] if denied == "ec2:DescribeKeyPairs" else [g for g in GRANTS if g != denied]
    with ec2_emulator() as emu:
        env = prepare_aws(project, emu, tmp_path)
        keys = emu.python_json(EC2.format(endpoint=emu.endpoint) + f"""
iam = boto3.client("iam", endpoint_url=ec2.meta.endpoint_url, region_name="us-east-1",
                   aws_access_key_id="x", aws_secret_access_key="x")
iam.create_user(UserName="limited")
iam.put_user_policy(UserName="limited", PolicyName="p", PolicyDocument=json.dumps({{"Version": "2012-10-17",
    "Statement": [{{"Effect": "Allow", "Action": {allowed!r}, "Resource": "*"}}]}}))
key = iam.create_access_key(UserName="limited")["AccessKey"]
print(json.dumps([key["AccessKeyId"], key["SecretAccessKey"]]))
""")
        private = Path(env["CLAP_PATH"]) / "private"
        (private / "ec2_access_key.pub").write_text(keys[0] + "\n")
        (private / "ec2_access_key.pem").write_text(keys[1] + "\n")
        emu.python_json("import json, urllib.request; urllib.request.urlopen(urllib.request.Request("
                        f"'{emu.endpoint}/moto-api/reset-auth', data=b'0', headers={{'Content-Type': 'text/plain'}}))"
                        "; print(json.dumps(True))")  # moto checks IAM from here on
        done = make(emu, env, "check")
    assert done.returncode != 0
    # make's own closing line ("make: ***", or "make[1]: ***" when the tests run under `make test`)
    lines = [line for line in done.stderr.splitlines() if line.strip() and not re.match(r"make(\[\d+\])?: ", line)]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    call = denied.split(":")[1]
    assert f"error: EC2 {call} was refused (" in lines[0], lines[0]
    assert f"grant your IAM user ec2:{call}" in lines[0] and keys[1] not in lines[0]
