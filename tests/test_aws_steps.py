"""`make check/up/status/down` with PROVIDER=aws against the EC2 emulator.

Every command runs inside a network namespace that has only loopback, where the
emulator listens, so nothing can leave the machine. The emulator's instances have
fake public addresses: CONNECTION_TRIES=0 and no role action, so none is contacted; where a
test needs a node that never answers SSH, the SSH wait is replaced by one that hears from none.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, clap_checkout, need_root
from ec2_emulator import Ec2Emulator, ec2_emulator

KEYPAIR = "dcgan-test-key"
GROUP = "open-security-group"
AMI = "ami-0c4f7023847b90238"  # clap_config/configs/instances.yaml

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
    extra = {k: v for k, v in env.items() if not k.startswith("AWS_") and k not in ("EC2_URL", "BOTO_CONFIG")}
    return emulator.run(["make", "-s", "-C", str(ROOT), *targets], extra_env=extra, timeout=600)


EC2 = """
import boto3, json
ec2 = boto3.client("ec2", endpoint_url="{endpoint}", region_name="us-east-1",
                   aws_access_key_id="x", aws_secret_access_key="x")
"""


def instances(emulator: Ec2Emulator, states: tuple[str, ...] = ("pending", "running")) -> list[dict]:
    return emulator.python_json(EC2.format(endpoint=emulator.endpoint) + f"""
found = [i for r in ec2.describe_instances(Filters=[{{"Name": "instance-state-name",
         "Values": {list(states)}}}])["Reservations"] for i in r["Instances"]]
for i in found:
    i["ShutdownBehavior"] = ec2.describe_instance_attribute(InstanceId=i["InstanceId"],
        Attribute="instanceInitiatedShutdownBehavior")["InstanceInitiatedShutdownBehavior"]["Value"]
    i["Disks"] = [v["Size"] for v in ec2.describe_volumes(Filters=[{{"Name": "attachment.instance-id",
                  "Values": [i["InstanceId"]]}}])["Volumes"]]
print(json.dumps([{{"id": i["InstanceId"], "type": i["InstanceType"], "shutdown": i["ShutdownBehavior"],
                   "disks": i["Disks"], "tags": {{t["Key"]: t["Value"] for t in i.get("Tags", [])}}}}
                  for i in found]))
""")


def launch_untagged(emulator: Ec2Emulator, instance_type: str) -> str:
    """An instance of our key pair and AMI with no tag of ours: what an `up` cut short leaves."""
    return emulator.python_json(EC2.format(endpoint=emulator.endpoint) + f"""
print(json.dumps(ec2.run_instances(ImageId="{AMI}", MinCount=1, MaxCount=1, InstanceType="{instance_type}",
                                   KeyName="{KEYPAIR}")["Instances"][0]["InstanceId"]))
""")


def terminate(emulator: Ec2Emulator, ids: list[str]) -> None:
    if ids:
        emulator.python_json(EC2.format(endpoint=emulator.endpoint)
                             + f"ec2.terminate_instances(InstanceIds={ids!r}); print(json.dumps(True))")


BAD_KEYS = [
    ("ec2_access_key.pub", "", "ec2_access_key.pub is missing or empty: put your AWS access key id in it"),
    ("ec2_access_key.pem", None, "ec2_access_key.pem is missing or empty: put your AWS secret access key in it"),
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
    ({"EFS_HOST": ""}, "EFS_HOST is empty: set it in .env"),
    ({"MAX_HOURS": "0"}, "MAX_HOURS='0' must be a number of hours above 0"),
])
def test_check_rejects_missing_settings(aws_env: dict, emulator: Ec2Emulator, setting: dict, message: str) -> None:
    done = make(emulator, {**aws_env, **setting}, "check")
    assert done.returncode != 0 and message in done.stderr


def test_check_passes_with_good_keys_and_one_ec2_call(aws_env: dict, emulator: Ec2Emulator) -> None:
    done = make(emulator, aws_env, "check")
    assert done.returncode == 0, done.stderr
    assert "ready: 2 x type-t2.medium on aws, runner docker" in done.stdout


def test_up_status_down_tags_and_terminates(aws_env: dict, emulator: Ec2Emulator) -> None:
    aws_env["CLAP"] = str(clap_checkout())
    up = make(emulator, aws_env, "up")
    assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-2000:]
    assert "expected cost: $0.0928 per hour" in up.stdout  # 2 x t2.medium, clap_config/prices.yaml
    assert_one_voice(up, aws_env, "up")
    cluster = json.loads(Path(aws_env["NODES_FILE"]).read_text())["cluster_id"]
    ours = [i for i in instances(emulator) if i["tags"].get("ClapClusterId") == cluster]
    assert len(ours) == 2
    secret = "example-secret-key"
    assert secret not in up.stdout + up.stderr and secret not in Path(aws_env["NODES_FILE"]).read_text()
    assert all(i["type"] == "t2.medium" and i["shutdown"] == "terminate" for i in ours), ours
    assert all(i["tags"]["ClapProject"] == "dcgan-clap" for i in ours)
    assert all(i["disks"] == [40] for i in ours), ours  # room for the CUDA torch image

    status = make(emulator, aws_env, "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.count(" alive") == 2 and "cost so far about $" in status.stdout

    # EC2 recycles public addresses: a node's key must not outlive it, or the next one is refused.
    known_hosts = Path(aws_env["CLAP_PATH"]) / "storage" / "known_hosts"
    key = (Path(aws_env["CLAP_PATH"]) / "private" / "key.pub").read_text().split()[:2]
    addresses = [node["address"] for node in json.loads(Path(aws_env["NODES_FILE"]).read_text())["nodes"]]
    known_hosts.write_text("".join(f"{host} {' '.join(key)}\n" for host in [*addresses, "192.0.2.7"]))

    down = make(emulator, aws_env, "down")
    assert down.returncode == 0, down.stderr
    assert_one_voice(down, aws_env, "down")
    assert not Path(aws_env["NODES_FILE"]).exists()
    assert known_hosts.read_text().split("\n")[0].startswith("192.0.2.7 ")  # another host's key stays
    assert not any(address in known_hosts.read_text() for address in addresses)
    assert [i for i in instances(emulator) if i["tags"].get("ClapClusterId") == cluster] == []
    assert {i["id"] for i in ours} <= {i["id"] for i in instances(emulator, ("terminated",))}


def assert_one_voice(done: subprocess.CompletedProcess, env: dict, step: str) -> None:
    """CLAP's own start, tag and stop playbooks print nothing on screen: they are in the step's log."""
    assert "PLAY [" not in done.stdout + done.stderr and "TASK [" not in done.stdout + done.stderr, done.stdout
    logs = sorted((Path(env["CLAP_PATH"]) / "storage" / "logs").glob(f"{step}-*.log"))
    assert logs and "PLAY [" in logs[-1].read_text(), logs


def test_a_failed_clap_start_is_one_sentence_naming_its_log(aws_env: dict, emulator: Ec2Emulator) -> None:
    """EC2 refuses the launch inside CLAP's own playbook (a key pair it does not know)."""
    aws_env["CLAP"] = str(clap_checkout())
    up = make(emulator, {**aws_env, "KEYPAIR_NAME": "no-such-key-pair"}, "up")
    assert up.returncode != 0
    lines = [line for line in up.stderr.splitlines() if line.strip() and not re.match(r"make(\[\d+\])?: ", line)]
    assert len(lines) == 1 and "Traceback" not in up.stdout + up.stderr, up.stderr
    assert lines[0].startswith("error: CLAP could not start the nodes: ")
    assert lines[0].endswith("; `make down` stops any node that started."), lines[0]
    log = Path(re.search(r"\(whole output: (\S+)\)", lines[0])[1])
    assert "PLAY [" in log.read_text() and "PLAY [" not in up.stdout + up.stderr
    assert instances(emulator) == []
    assert json.loads(Path(aws_env["NODES_FILE"]).read_text())["steps"]["up"]["state"] == "failed"


def test_orphans_are_found_by_tag_when_every_record_is_lost(aws_env: dict, emulator: Ec2Emulator) -> None:
    aws_env["CLAP"] = str(clap_checkout())
    assert make(emulator, aws_env, "up").returncode == 0
    cluster = json.loads(Path(aws_env["NODES_FILE"]).read_text())["cluster_id"]
    Path(aws_env["NODES_FILE"]).unlink()
    (Path(aws_env["CLAP_PATH"]) / "storage" / "nodes.db").unlink()

    status = make(emulator, aws_env, "status")
    assert status.returncode != 0  # something runs that no record names: not a clean state
    assert "instances of this project are running" in status.stdout

    down = make(emulator, aws_env, "down")
    assert down.returncode == 0, down.stderr
    assert [i for i in instances(emulator) if i["tags"].get("ClapClusterId") == cluster] == []


def test_check_rejects_a_missing_security_group(aws_env: dict, emulator: Ec2Emulator) -> None:
    instances_file = Path(aws_env["CLAP_PATH"]) / "configs" / "instances.yaml"
    instances_file.write_text(instances_file.read_text().replace(f"security_group: {GROUP}",
                                                                 "security_group: no-such-group"))
    done = make(emulator, aws_env, "check")
    assert done.returncode != 0
    assert "error: security group no-such-group (INSTANCE_TYPE=type-t2.medium in" in done.stderr
    assert "does not exist in us-east-1" in done.stderr


def test_check_names_the_python_that_cannot_import_boto(aws_env: dict, emulator: Ec2Emulator,
                                                        tmp_path: Path) -> None:
    """boto2, which CLAP's `ec2` module needs, fails to import on Python 3.12+ as this stand-in does."""
    broken = tmp_path / "py312" / "boto"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'boto.vendored.six.moves'\")\n")
    done = make(emulator, {**aws_env, "PYTHONPATH": str(broken.parent)}, "check")
    assert done.returncode != 0
    assert "cannot import boto (No module named 'boto.vendored.six.moves'), which `make up`" in done.stderr
    assert "make deps PYTHON=python3.11" in done.stderr and "Traceback" not in done.stderr


def test_status_and_down_find_instances_up_left_untagged(aws_env: dict, emulator: Ec2Emulator) -> None:
    aws_env["CLAP"] = str(clap_checkout())
    assert make(emulator, aws_env, "up").returncode == 0
    cut_short = launch_untagged(emulator, "t2.medium")  # the ec2 module started it, then `up` was cut
    someone_elses = launch_untagged(emulator, "t2.small")  # same key pair, not what `up` asked for
    try:
        status = make(emulator, aws_env, "status")
        assert f"{cut_short} (untagged)" in status.stdout and someone_elses not in status.stdout

        down = make(emulator, aws_env, "down")
        assert down.returncode == 0, down.stderr
        assert f"never tagged: {cut_short}" in down.stderr
        states = {i["id"]: "live" for i in instances(emulator)}
        assert cut_short not in states and someone_elses in states
    finally:
        terminate(emulator, [cut_short, someone_elses])


def test_up_terminates_nodes_that_never_answer_ssh(aws_env: dict, emulator: Ec2Emulator) -> None:
    aws_env["CLAP"] = str(clap_checkout())
    env = {k: v for k, v in aws_env.items() if not k.startswith("AWS_") and k not in ("EC2_URL", "BOTO_CONFIG")}
    up = emulator.python(f"""
import sys
sys.path.insert(0, {str(ROOT / "scripts")!r})
import aws_nodes, output, up
aws_nodes.wait_for_ssh = lambda settings, handles, state, ids: list(ids)  # BOOT_TIMEOUT passed, none answered
output.main_guard(up.main)
""", extra_env={**env, "CONNECTION_TRIES": "1", "BOOT_TIMEOUT": "10"}, timeout=600)
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


def test_an_ec2_refusal_is_one_sentence(project: dict, tmp_path: Path) -> None:
    """IAM that allows DescribeRegions but not DescribeSecurityGroups: `make check` says which call
    to grant, with no traceback. moto checks IAM only once auth is on (a private emulator)."""
    need_root()
    with ec2_emulator() as emu:
        env = prepare_aws(project, emu, tmp_path)
        keys = emu.python_json(EC2.format(endpoint=emu.endpoint) + """
iam = boto3.client("iam", endpoint_url=ec2.meta.endpoint_url, region_name="us-east-1",
                   aws_access_key_id="x", aws_secret_access_key="x")
iam.create_user(UserName="regions-only")
iam.put_user_policy(UserName="regions-only", PolicyName="p", PolicyDocument=json.dumps({"Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "ec2:DescribeRegions", "Resource": "*"}]}))
key = iam.create_access_key(UserName="regions-only")["AccessKey"]
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
    assert "error: EC2 DescribeSecurityGroups was refused (" in lines[0]
    assert "grant your IAM user ec2:DescribeSecurityGroups" in lines[0] and keys[1] not in lines[0]
