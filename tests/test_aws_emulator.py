"""Our EC2 provider and scripts/aws.py against a moto EC2 emulator.

Everything that talks EC2 runs inside a network namespace with only `lo`
(see tests/ec2_emulator.py): the server and each client snippet.  Needs root
(for the namespace) and, for the provider tests, `CLAP` = path of a CLAP checkout.
The instances' public IPs are fake: nothing here connects to them, and
`is_alive` is called with retries=0, which skips its SSH loop
(node_manager.py:274 loops `range(retries)`).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))
sys.path.insert(0, str(ROOT / "tests"))

import aws  # noqa: E402
from conftest import without_clap  # noqa: E402
from ec2_emulator import (  # noqa: E402
    UBUNTU_LTS_AMI,
    UBUNTU_LTS_PARAMETER,
    Ec2Emulator,
    ec2_emulator,
    netns_exists,
    write_clap_config,
)

PROVIDER_ID = "aws-emu"  # the providers.yaml entry write_clap_config makes
ACCESS_KEY = "AKIAEMULATOR00000000"
SECRET_KEY = "emulator-secret-do-not-print"

# One worker runs them all: they share the module's emulator, which takes seconds to start.
pytestmark = pytest.mark.xdist_group("aws_emulator")


def _root_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a loopback-only network namespace"
    if shutil.which("ip") is None:
        return "iproute2 `ip` not found"
    try:
        import moto.server  # noqa: F401
    except ImportError:
        return "moto[server] is not installed in this Python"
    return None


_ROOT_REASON = _root_reason()
needs_root = pytest.mark.skipif(_ROOT_REASON is not None, reason=_ROOT_REASON or "")


def _clap_reason() -> str | None:
    """Why CLAP can't be driven here, or None."""
    clap = os.environ.get("CLAP", "")
    if not clap:
        return "CLAP is unset: set CLAP=/path/to/a/CLAP/checkout"
    if not (Path(clap) / "app" / "cli" / "modules" / "node.py").is_file():
        return f"CLAP={clap} is not a CLAP checkout (no app/cli/modules/node.py)"
    return None


# A snippet's common head: our helpers, CLAP on sys.path, an EC2 client built
# from CLAP's own config (so session_from_clap_config and AWS_ENDPOINT_URL are exercised).
PRELUDE = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.environ["SCRIPTS_DIR"])
if os.environ.get("CLAP"):
    sys.path.insert(0, os.environ["CLAP"])
import aws
import aws_account
CLAP_PATH = Path(os.environ["CLAP_PATH"])
ec2 = aws.ec2_client_from_clap_config(CLAP_PATH, "aws-emu")
def out(obj):
    print(json.dumps(obj, default=str))
def live(ids):
    r = ec2.describe_instances(Filters=[{"Name": "instance-id", "Values": list(ids)}])
    return {i["InstanceId"]: i["State"]["Name"] for x in r["Reservations"] for i in x["Instances"]}
"""


def run_snippet(emu: Ec2Emulator, clap_path: Path, body: str, timeout: float = 120) -> Any:
    env = {"SCRIPTS_DIR": str(SCRIPTS), "CLAP_PATH": str(clap_path), "CLAP": os.environ.get("CLAP", "")}
    return emu.python_json(PRELUDE + textwrap.dedent(body), extra_env=env, timeout=timeout)


@pytest.fixture(scope="module")
def emulator() -> Iterator[Ec2Emulator]:
    if _ROOT_REASON:
        pytest.skip(_ROOT_REASON)
    with ec2_emulator() as emu:
        yield emu
    assert not netns_exists(emu.netns)


@pytest.fixture(scope="module")
def clap_path(emulator: Ec2Emulator, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CLAP_PATH whose key pair and security group exist in moto."""
    path = tmp_path_factory.mktemp("clap")
    write_clap_config(path, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    run_snippet(
        emulator,
        path,
        """
        ec2.create_key_pair(KeyName="clap-emu-key")
        ec2.create_security_group(GroupName="clap-emu-sg", Description="CLAP emulator tests")
        out("ok")
        """,
    )
    return path


@pytest.fixture(scope="module")
def clap_ok() -> None:
    reason = _clap_reason()
    if reason:
        without_clap(reason)


# ------------------------------------------------------------------ emulator


@needs_root
def test_emulator_serves_every_client_and_canonicals_ubuntu_lts(emulator: Ec2Emulator, tmp_path: Path) -> None:
    body = f"""
    session = aws.session_from_clap_config(CLAP_PATH, "aws-emu")
    ami = aws_account.resolve_image(session, "resolve:ssm:{UBUNTU_LTS_PARAMETER}")
    image = aws_account.find_image(ec2, ami)
    out({{"ami": ami, "root": image["RootDeviceName"], "owner": image["OwnerId"],
          "unknown": aws_account.find_image(ec2, "ami-0000000000000dead"), "endpoint": ec2.meta.endpoint_url,
          "ssm": aws.client(session, "ssm").meta.endpoint_url}})
    """
    write_clap_config(tmp_path, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    res = run_snippet(emulator, tmp_path, body)
    assert res["ami"] == UBUNTU_LTS_AMI and res["root"] == "/dev/sda1" and res["owner"] == "099720109477"
    assert res["unknown"] is None
    assert res["endpoint"] == res["ssm"] == emulator.endpoint and emulator.endpoint.startswith("http://127.0.0.1:")


@needs_root
def test_emulator_teardown_kills_server_and_deletes_netns() -> None:
    with pytest.raises(RuntimeError, match="boom"), ec2_emulator() as emu:
        netns, pid = emu.netns, emu.pid
        assert netns_exists(netns)
        assert emu.run(["ip", "route"]).stdout.strip() == ""  # no route out of the namespace
        raise RuntimeError("boom")
    assert not netns_exists(netns)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# ------------------------------------------------------------------ our provider, inside CLAP


PROVIDER_PRELUDE = """
import cluster, config, output
from app.cli.modules.node import get_config_db
settings = config.load_settings({"ENV_FILE": os.devnull, "CLAP_PATH": str(CLAP_PATH), "PROVIDER": "aws",
                                 "INSTANCE_TYPE": "type-t2.medium", "KEYPAIR_NAME": "clap-emu-key",
                                 "NODES_FILE": str(CLAP_PATH / "nodes.json"), "CLAP": os.environ["CLAP"]})
state = {"cluster_id": "c-provider", "created": __import__("time").time()}
nm = cluster.clap(settings, state).node_manager
info = cluster.instance_info(settings, get_config_db())
"""


@needs_root
def test_provider_starts_watches_and_stops_through_clap(clap_ok: None, emulator: Ec2Emulator, clap_path: Path) -> None:
    body = PROVIDER_PRELUDE + textwrap.dedent("""
    ids = nm.start_node(info, count=3)
    nodes = nm.get_nodes_by_id(ids)
    cloud = [n.cloud_instance_id for n in nodes]
    ec2.stop_instances(InstanceIds=cloud[1:2])  # someone stopped one in the console
    node = nodes[2]
    node.cloud_instance_id = "i-0123456789abcdef0"  # an instance EC2 has forgotten
    nm.upsert_node(node)
    checked = {n.node_id: n.status for n in nm.providers["aws"].update_instance_info(nm.get_nodes_by_id(ids))}
    alive = nm.is_alive(ids, retries=0)  # provider check only: retries=0 never runs SSH
    tags = {i: aws.tags_of(inst) for i, inst in aws.describe(ec2, cloud[:2]).items()}
    stopped = nm.stop_nodes(ids)
    after = live(cloud)
    aws.terminate_and_wait(ec2, cloud[2:], timeout=30)  # the instance the record no longer names
    out({"ids": ids, "cloud": cloud, "checked": checked, "alive": alive, "tags": tags, "stopped": stopped,
         "ips": [n.ip for n in nodes[:2]], "after": after, "records": len(nm.get_all_nodes()),
         "owner": (CLAP_PATH / ".owner").read_text().strip()})
    """)
    res = run_snippet(emulator, clap_path, body, timeout=240)
    ids, cloud = res["ids"], res["cloud"]
    assert len(ids) == 3 and len(set(cloud)) == 3 and all(res["ips"])
    for tags in res["tags"].values():
        assert tags == {aws.TAG_PROJECT: "dcgan-clap", aws.TAG_CLUSTER: "c-provider", aws.TAG_OWNER: res["owner"],
                        "Name": "dcgan-clap-c-provider"}
    assert [res["checked"][i] for i in ids] == ["started", "paused", "stopped"]
    # "alive" means "answered SSH", which retries=0 never tries: the point is no error on the forgotten one
    assert res["alive"] == dict.fromkeys(ids, False)
    assert sorted(res["stopped"]) == sorted(ids) and res["records"] == 0
    assert [res["after"][c] for c in cloud] == ["terminated", "terminated", "running"]


@needs_root
def test_a_start_that_ends_before_running_is_one_sentence(clap_ok: None, emulator: Ec2Emulator,
                                                         clap_path: Path) -> None:
    """A spot request EC2 cannot fill, a capacity shortage: the instance ends instead of running."""
    body = PROVIDER_PRELUDE + textwrap.dedent("""
    real_wait = aws.wait_running
    def ended_first(client, ids, timeout):
        client.terminate_instances(InstanceIds=list(ids))
        return real_wait(client, ids, timeout)
    aws.wait_running = ended_first
    try:
        nm.start_node(info, count=1)
        out("started")
    except output.UserError as error:
        out(str(error))
    """)
    message = run_snippet(emulator, clap_path, body, timeout=240)
    assert message.startswith("the instances did not all reach `running` (waited up to 600 s): i-"), message
    assert " terminated" in message and message.endswith("`make down` terminates them.") and "\n" not in message


@needs_root
def test_instances_are_found_by_owner_and_cluster(emulator: Ec2Emulator, clap_path: Path) -> None:
    body = """
    def start(owner, cluster):
        tags = [{"Key": aws.TAG_PROJECT, "Value": "proj-find"}, {"Key": aws.TAG_OWNER, "Value": owner},
                {"Key": aws.TAG_CLUSTER, "Value": cluster}]
        started = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.micro",
                                    TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])
        return started["Instances"][0]["InstanceId"]
    mine, mine_too, theirs = start("o-me", "c-1"), start("o-me", "c-2"), start("o-them", "c-1")
    def found(**tags):
        return sorted(i["InstanceId"] for i in aws.find_cluster_instances(ec2, "proj-find", **tags))
    res = {"all": found(), "mine": found(owner="o-me"), "c1": found(owner="o-me", cluster_id="c-1"),
           "expected": [sorted([mine, mine_too, theirs]), sorted([mine, mine_too]), [mine]]}
    aws.terminate_and_wait(ec2, [mine, mine_too, theirs], timeout=30)
    res["left"] = found()
    out(res)
    """
    res = run_snippet(emulator, clap_path, body)
    assert [res["all"], res["mine"], res["c1"]] == res["expected"]
    assert res["left"] == []


# ------------------------------------------------------------------ scripts/aws.py


@needs_root
def test_terminate_and_wait_tolerates_unknown_and_terminated(emulator: Ec2Emulator, clap_path: Path) -> None:
    body = """
    r = ec2.run_instances(ImageId="ami-12c6146b", MinCount=3, MaxCount=3, InstanceType="t3.micro")
    ids = [i["InstanceId"] for i in r["Instances"]]
    ec2.terminate_instances(InstanceIds=ids[:1])
    ec2.stop_instances(InstanceIds=ids[1:2])
    aws.terminate_and_wait(ec2, ids + ["i-0123456789abcdef0", "i-0123456789abcdef0"], timeout=30)
    aws.terminate_and_wait(ec2, ids, timeout=30)  # again: all already terminated
    aws.terminate_and_wait(ec2, [], timeout=1)
    out(live(ids))
    """
    states = run_snippet(emulator, clap_path, body)
    assert len(states) == 3 and set(states.values()) == {"terminated"}


@needs_root
def test_security_group_open_to_its_members(emulator: Ec2Emulator, clap_path: Path) -> None:
    body = """
    gid = ec2.create_security_group(GroupName="intra", Description="x")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    before = aws_account.groups_closed_to_members(ec2, "intra")
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535, "UserIdGroupPairs": [{"GroupId": gid}]}])
    after = aws_account.groups_closed_to_members(ec2, "intra")
    out([before == [gid], after, aws_account.groups_closed_to_members(ec2, "no-such-group")])
    """
    assert run_snippet(emulator, clap_path, body) == [True, [], None]


@needs_root
def test_a_template_subnet_launches_in_its_vpcs_group_by_id(emulator: Ec2Emulator, clap_path: Path) -> None:
    """EC2 takes a group name only in the default VPC: in a template's subnet the launch names the
    group of that subnet's VPC by id, and a VPC without the group is one sentence, before any launch."""
    body = """
    import aws_launch
    vpc = ec2.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.77.1.0/24")["Subnet"]["SubnetId"]
    ec2.create_security_group(GroupName="open", Description="default VPC's")
    gid = ec2.create_security_group(GroupName="open", Description="x", VpcId=vpc)["GroupId"]
    template = {"flavor": "t2.micro", "security_group": "open"}
    by_name = aws_launch.security_groups(ec2, template)
    by_id = aws_launch.security_groups(ec2, {**template, "network_ids": [subnet]})
    try:
        aws_launch.security_groups(ec2, {**template, "security_group": "elsewhere", "network_ids": [subnet]})
        missing = None
    except aws.AwsError as error:
        missing = str(error)
    out([by_name, by_id == {"SecurityGroupIds": [gid]}, missing.replace(vpc, "VPC").replace(subnet, "SUBNET")])
    """
    by_name, by_id, missing = run_snippet(emulator, clap_path, body)
    assert by_name == {"SecurityGroups": ["open"]} and by_id is True
    assert missing == ("no security group elsewhere in VPC, the VPC of subnet SUBNET (network_ids of t2.micro in "
                       "instances.yaml): create it there with an all-TCP rule from the group itself, or name a "
                       "group of that VPC")


@needs_root
def test_check_credentials(tmp_path: Path) -> None:
    """moto accepts any key unless IAM auth is on; turn it on (moto-api/reset-auth) in a
    private emulator so a wrong key is really refused."""
    write_clap_config(tmp_path, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    body = """
    import urllib.request
    def msg(fn):
        try:
            fn()
            return None
        except aws.AwsError as e:
            return str(e)
    def client(key_id, secret):
        import boto3
        return boto3.client("ec2", region_name="us-east-1",
                            aws_access_key_id=key_id, aws_secret_access_key=secret)
    def reset_auth(count):
        # text/plain: with urllib's default form type Flask hides the body from moto
        req = urllib.request.Request(os.environ["AWS_ENDPOINT_URL"] + "/moto-api/reset-auth", data=count.encode(),
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=5).read()
    res = {"any_key": msg(lambda: aws_account.check_credentials(ec2))}
    iam = aws.session_from_clap_config(CLAP_PATH, "aws-emu").client("iam")
    for user, policy in (("ok", "ec2:*"), ("noperm", "s3:ListBucket")):
        iam.create_user(UserName=user)
        iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": policy, "Resource": "*"}]}))
        k = iam.create_access_key(UserName=user)["AccessKey"]
        res[user] = (k["AccessKeyId"], k["SecretAccessKey"])
    reset_auth("0")
    try:
        good_id, good_secret = res.pop("ok")
        np_id, np_secret = res.pop("noperm")
        res["good"] = msg(lambda: aws_account.check_credentials(client(good_id, good_secret)))
        res["wrong_id"] = msg(lambda: aws_account.check_credentials(client("AKIAWRONGWRONGWRONG0", good_secret)))
        res["wrong_secret"] = msg(lambda: aws_account.check_credentials(client(good_id, "wrong-secret")))
        res["no_permission"] = msg(lambda: aws_account.check_credentials(client(np_id, np_secret)))
    finally:
        reset_auth("inf")
    # Nothing listens on port 9 in this namespace; one attempt keeps the test short
    # (ec2_client_from_clap_config retries 3 times, ~4 s here).
    from botocore.config import Config
    no_endpoint = aws.session_from_clap_config(CLAP_PATH, "aws-emu").client(
        "ec2", endpoint_url="http://127.0.0.1:9", config=Config(retries={"max_attempts": 1}))
    res["no_endpoint"] = msg(lambda: aws_account.check_credentials(no_endpoint))
    res["secrets"] = [good_secret, np_secret]
    out(res)
    """
    with ec2_emulator() as emu:
        res = run_snippet(emu, tmp_path, body)
    secrets = res.pop("secrets") + [SECRET_KEY]
    assert res["any_key"] is None and res["good"] is None
    assert "rejected the credentials" in res["wrong_id"] and "access_keyfile" in res["wrong_id"]
    assert "rejected the credentials" in res["wrong_secret"]
    assert "EC2 permissions" in res["no_permission"]
    assert "cannot reach the EC2 endpoint http://127.0.0.1:9" in res["no_endpoint"]
    for message in filter(None, res.values()):
        assert "\n" not in message and not any(s in message for s in secrets)


def test_session_from_clap_config_errors(tmp_path: Path) -> None:
    write_clap_config(tmp_path, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    session = aws.session_from_clap_config(tmp_path, PROVIDER_ID)
    assert session.region_name == "us-east-1"
    assert session.get_credentials().access_key == ACCESS_KEY
    with pytest.raises(aws.AwsError, match="no aws provider named 'nope'"):
        aws.session_from_clap_config(tmp_path, "nope")
    (tmp_path / "private" / "aws_secret_key").unlink()
    with pytest.raises(aws.AwsError, match="cannot read the secret key file") as err:
        aws.session_from_clap_config(tmp_path, PROVIDER_ID)
    assert SECRET_KEY not in str(err.value)


def test_hourly_cost() -> None:
    assert aws.hourly_cost("t2.medium", "us-east-1", 2) == pytest.approx(0.0928)
    assert aws.hourly_cost("t3.large", "us-east-1", 0) == 0
    with pytest.raises(aws.AwsError, match="no price for x1.huge in us-east-1"):
        aws.hourly_cost("x1.huge", "us-east-1", 1)
    with pytest.raises(ValueError):
        aws.hourly_cost("t2.micro", "us-east-1", -1)


# ------------------------------------------------------------------ the rules of a real account


def test_an_ec2_refusal_becomes_one_sentence() -> None:
    from botocore.exceptions import ClientError

    import output

    error = ClientError({"Error": {"Code": "UnauthorizedOperation",
                                   "Message": "You are not authorized.\nEncoded message: abc"}}, "CreateTags")
    assert aws.refusal(error) == ("EC2 CreateTags was refused (UnauthorizedOperation: You are not authorized. "
                                  "Encoded message: abc): grant your IAM user ec2:CreateTags (an admin of the "
                                  "account can)")
    with pytest.raises(output.UserError) as raised, aws.aws_errors("the nodes are recorded"):
        raise error
    assert str(raised.value).endswith("(an admin of the account can); the nodes are recorded.")


class StuckEc2:
    """EC2 as terminate_and_wait sees it, with an instance that never gets past shutting-down."""

    def __init__(self) -> None:
        self.terminated: list[str] = []

    def get_paginator(self, operation: str) -> Any:
        instance = {"InstanceId": "i-0123456789abcdef0", "State": {"Name": "shutting-down"}}
        return type("Pages", (), {"paginate": lambda _, **kw: [{"Reservations": [{"Instances": [instance]}]}]})()

    def terminate_instances(self, InstanceIds: list[str]) -> None:  # noqa: N803  boto3's own keyword
        self.terminated += InstanceIds


def test_a_termination_past_its_deadline_is_one_sentence() -> None:
    import output

    with pytest.raises(output.UserError) as raised, aws.aws_errors("run `make down` again"):
        aws.terminate_and_wait(StuckEc2(), ["i-0123456789abcdef0"], timeout=1)
    assert str(raised.value) == ("instances not terminated after 1 s: i-0123456789abcdef0 (shutting-down); "
                                 "run `make down` again.")


class FakeNodes:
    """CLAP's node manager as wait_for_ssh sees it, on a clock that sleeps advance."""

    def __init__(self, answers_after: dict[str, float]) -> None:
        self.now = 0.0
        self.answers_after = answers_after
        self.calls: list[tuple[list[str], dict]] = []

    def is_alive(self, ids: list[str], **options: Any) -> dict[str, bool]:
        self.calls.append((list(ids), options))
        return {node_id: self.now >= self.answers_after[node_id] for node_id in ids}

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_aws_up_waits_for_a_slow_boot(project: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import aws_nodes
    import cluster
    import config

    settings = config.load_settings({**project, "PROVIDER": "aws", "MAX_HOURS": "2"})
    assert settings.boot_timeout == 300  # the default: a fresh Ubuntu can take minutes
    nodes = FakeNodes({"fast": 0, "slow": 240, "never": float("inf")})
    monkeypatch.setattr(aws_nodes.time, "monotonic", lambda: nodes.now)
    monkeypatch.setattr(aws_nodes.time, "sleep", nodes.sleep)
    handles = cluster.Clap(None, nodes, None)
    state = {"created": time.time()}

    assert aws_nodes.wait_for_ssh(settings, handles, state, ["fast", "slow"]) == []
    assert nodes.calls[0] == (["fast", "slow"], {"retries": 1})
    assert all(ids == ["slow"] for ids, _ in nodes.calls[1:])  # a node that answered is not asked again

    nodes.now, nodes.calls = 0.0, []
    assert aws_nodes.wait_for_ssh(settings, handles, state, ["fast", "never"]) == ["never"]
    assert 300 - aws_nodes.AWS_SSH_EVERY_S <= nodes.now <= 300  # given up at BOOT_TIMEOUT, not after 3 x 5 s

    local = config.load_settings({**project, "CONNECTION_TRIES": "3"})
    nodes.calls = []
    assert aws_nodes.wait_for_ssh(local, handles, state, ["never"]) == ["never"]
    assert nodes.calls == [(["never"], {"retries": 3, "wait_timeout": 5})]


def test_an_exception_of_clap_during_the_ssh_wait_is_one_sentence(project: dict) -> None:
    import aws_nodes
    import cluster
    import config
    import output

    class Broken:
        def is_alive(self, ids: list[str], **options: Any) -> dict[str, bool]:
            raise EOFError("Error reading SSH protocol banner")

    settings = config.load_settings({**project, "PROVIDER": "aws"})
    with pytest.raises(output.UserError, match=r"^CLAP failed while waiting for the nodes to answer SSH \(Error "
                                               r"reading SSH protocol banner\): they are recorded; `make down` "
                                               r"stops them\.$"):
        aws_nodes.wait_for_ssh(settings, cluster.Clap(None, Broken(), None), {"created": time.time()}, ["a"])


def test_setup_and_the_user_data_agree_on_the_lifetime_cap(project: dict) -> None:
    import aws_launch
    import config
    import role

    settings = config.load_settings({**project, "PROVIDER": "aws", "MAX_HOURS": "3"})
    state = {"cluster_id": "c-1", "created": time.time() - 60 * 60 + 30, "nodes": []}
    launch = aws_launch.launch_for(settings, state, "o-" + "0" * 16)
    assert role.role_vars(settings, state, "setup")["shutdown_after_minutes"] == 120
    assert round((launch.ends_at - time.time()) / 60) == 120
    assert f"{int(launch.ends_at)} - $(date +%s)" in aws_launch.user_data(launch.ends_at)


def test_env_example_offers_the_efs_mount_target_address() -> None:
    """The EFS DNS name resolves only in zones with a mount target; its address works from every zone."""
    example = (ROOT / ".env.example").read_text()
    value = next(line.split("=", 1)[1] for line in example.splitlines() if line.startswith("# EFS_HOST="))
    ipaddress.ip_address(value)
