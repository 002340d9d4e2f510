"""CLAP's AWS provider and scripts/aws.py against a moto EC2 emulator.

Everything that talks EC2 runs inside a network namespace with only `lo`
(see tests/ec2_emulator.py): the server and each client snippet.  Needs root
(for the namespace) and, for the CLAP tests, `CLAP` = path of a CLAP checkout.
The instances' public IPs are fake: nothing here connects to them, and
`is_alive` is called with retries=0, which skips its SSH loop
(node_manager.py:274 loops `range(retries)`).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
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
    Ec2Emulator,
    ScopeRewriteMiddleware,
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
    """Why CLAP's provider can't be tested here, or None."""
    clap = os.environ.get("CLAP", "")
    if not clap:
        return "CLAP is unset: set CLAP=/path/to/a/CLAP/checkout"
    if not (Path(clap) / "providers" / "provider_ansible_aws.py").is_file():
        return f"CLAP={clap} is not a CLAP checkout (no providers/provider_ansible_aws.py)"
    if shutil.which("ansible-playbook", path=str(Path(sys.executable).parent)) is None:
        return "ansible-playbook is not installed beside this Python"
    probe = (
        "import os, sys, tempfile; os.environ['CLAP_PATH'] = tempfile.mkdtemp(); "
        f"sys.path.insert(0, {clap!r}); import app.cli.modules.node, boto, "
        "ansible_collections.amazon.aws"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return f"CLAP at {clap} is not importable: {last}"
    return None


# A snippet's common head: our helpers, CLAP on sys.path, an EC2 client built
# from CLAP's own config (so session_from_clap_config and EC2_URL are exercised).
PRELUDE = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, os.environ["SCRIPTS_DIR"])
if os.environ.get("CLAP"):
    sys.path.insert(0, os.environ["CLAP"])
import aws
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


def test_scope_rewrite_only_touches_host_derived_scopes() -> None:
    mw = ScopeRewriteMiddleware(lambda *_: None, "us-east-1")
    boto2 = "AWS4-HMAC-SHA256 Credential=AKID/20260101/0/127/aws4_request,SignedHeaders=host,Signature=ab"
    boto3 = "AWS4-HMAC-SHA256 Credential=AKID/20260101/eu-west-1/ec2/aws4_request, SignedHeaders=host, Signature=ab"
    assert mw.rewrite(boto2) == boto2.replace("/0/127/", "/us-east-1/ec2/")
    assert mw.rewrite(boto3) == boto3
    assert mw.rewrite("AWS AKID:sig") == "AWS AKID:sig"


@needs_root
def test_emulator_accepts_boto2_and_boto3(emulator: Ec2Emulator, tmp_path: Path) -> None:
    body = """
    import boto
    b2 = boto.connect_ec2_endpoint(os.environ["EC2_URL"], aws_access_key_id="AKIAB2", aws_secret_access_key="x")
    ec2.create_key_pair(KeyName="made-by-boto3")
    b2.create_security_group("made-by-boto2", "boto2 group")
    out({
        "boto2_keys": [k.name for k in b2.get_all_key_pairs()],
        "boto3_groups": [g["GroupName"] for g in ec2.describe_security_groups()["SecurityGroups"]],
        "boto2_region": b2.region.name,
        "endpoint": os.environ["EC2_URL"],
    })
    """
    write_clap_config(tmp_path, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    res = run_snippet(emulator, tmp_path, body)
    # Both clients land in the same (us-east-1) backend of moto.
    assert "made-by-boto3" in res["boto2_keys"]
    assert "made-by-boto2" in res["boto3_groups"]
    assert res["endpoint"].startswith("http://127.0.0.1:")


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


# ------------------------------------------------------------------ CLAP provider


@needs_root
def test_clap_start_tag_check_stop(clap_ok: None, emulator: Ec2Emulator, clap_path: Path) -> None:
    body = """
    from app.cli.modules.node import get_config_db, get_node_manager
    nm = get_node_manager()
    info = get_config_db().instance_descriptors["type-t2.medium"]
    ids = nm.start_node(info, count=2)
    cloud = [n.cloud_instance_id for n in nm.get_nodes_by_id(ids)]
    aws.tag_instances(ec2, cloud, "proj-a", "cluster-1")
    after_start = ec2.describe_instances(InstanceIds=cloud)
    alive = nm.is_alive(ids, retries=0)  # provider check only: retries=0 never runs SSH
    checked = {n.node_id: [n.status, n.extra["instance_tags"]] for n in nm.get_nodes_by_id(ids)}
    stopped = nm.stop_nodes(ids)
    out({
        "ids": ids, "cloud": cloud, "alive": alive, "checked": checked, "stopped": stopped,
        "instances": [i for r in after_start["Reservations"] for i in r["Instances"]],
        "after_stop": live(cloud), "records": len(nm.get_all_nodes()),
    })
    """
    res = run_snippet(emulator, clap_path, body, timeout=240)
    assert len(res["ids"]) == 2 and len(set(res["cloud"])) == 2
    for inst in res["instances"]:
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert inst["State"]["Name"] == "running" and inst["InstanceType"] == "t2.medium"
        assert tags["CreatedWith"] == "CLAP" and tags["Name"]  # CLAP's own tags
        assert tags[aws.TAG_PROJECT] == "proj-a" and tags[aws.TAG_CLUSTER] == "cluster-1"
    # is_alive(retries=0) refreshed the records from EC2 (status, tags) and
    # reports False for all: "alive" means "answered SSH", which it never tried.
    assert res["alive"] == {i: False for i in res["ids"]}
    for status, tags in res["checked"].values():
        assert status == "started" and tags[aws.TAG_PROJECT] == "proj-a"
    assert sorted(res["stopped"]) == sorted(res["ids"])
    assert set(res["after_stop"].values()) == {"terminated"}
    assert res["records"] == 0


@needs_root
def test_orphan_sweep_finds_instance_without_clap_record(clap_ok: None, emulator: Ec2Emulator, clap_path: Path) -> None:
    body = """
    from app.cli.modules.node import get_config_db, get_node_manager
    nm = get_node_manager()
    ids = nm.start_node(get_config_db().instance_descriptors["type-t2.medium"], count=1)
    cloud = [n.cloud_instance_id for n in nm.get_nodes_by_id(ids)]
    aws.tag_instances(ec2, cloud, "proj-orphan", "cluster-9")
    nm.node_repository.remove_nodes(ids)  # CLAP forgets it: an orphan
    records = [n.node_id for n in nm.get_all_nodes()]
    found = [i["InstanceId"] for i in aws.find_cluster_instances(ec2, "proj-orphan", "cluster-9")]
    other = aws.find_cluster_instances(ec2, "proj-orphan", "cluster-other")
    # Launched with the key pair, AMI and type but never tagged (what a timed-out start leaves).
    launch = aws.Launch("clap-emu-key", "ami-12c6146b", "t2.micro", since=time.time())
    untagged = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1,
                                 InstanceType="t2.micro", KeyName="clap-emu-key")["Instances"][0]["InstanceId"]
    by_launch = [i["InstanceId"] for i in aws.find_untagged_launches(ec2, launch)]
    aws.terminate_and_wait(ec2, found + by_launch, timeout=30)
    out({"ids": ids, "cloud": cloud, "records": records, "found": found, "other": len(other),
         "untagged": untagged, "by_launch": by_launch, "after": live(cloud + [untagged]),
         "left": len(aws.find_cluster_instances(ec2, "proj-orphan") + aws.find_untagged_launches(ec2, launch))})
    """
    res = run_snippet(emulator, clap_path, "import time\n" + textwrap.dedent(body), timeout=240)
    assert res["ids"][0] not in res["records"]
    assert res["found"] == res["cloud"]
    assert res["other"] == 0
    assert res["by_launch"] == [res["untagged"]]  # CLAP's instance is tagged (CreatedWith), and ours
    assert set(res["after"].values()) == {"terminated"}
    assert res["left"] == 0


@needs_root
def test_clap_provider_subclass_tags_at_launch(clap_ok: None, emulator: Ec2Emulator, clap_path: Path) -> None:
    """Alternative to tagging after start: our tags ride in the start playbook itself,
    so they are set by the same `ec2` call as CLAP's CreatedWith (no untagged window
    beyond the module's own wait). Only `_run_template`'s signature is relied on."""
    body = """
    import yaml
    from app.cli.modules.node import get_config_db, get_node_manager
    from providers.provider_ansible_aws import AnsibleAWSProvider

    class TaggingAWSProvider(AnsibleAWSProvider):
        def __init__(self, private_dir, extra_tags, verbosity=0):
            super().__init__(private_dir, verbosity)
            self.extra_tags = extra_tags

        def _run_template(self, output_filename, rendered_template, envvars=None, quiet=False):
            if output_filename == "start_instances.yml":
                play = yaml.safe_load(rendered_template)
                play[0]["tasks"][0]["ec2"]["instance_tags"].update(self.extra_tags)
                rendered_template = yaml.safe_dump(play, sort_keys=False)
            return super()._run_template(output_filename, rendered_template, envvars, quiet)

    nm = get_node_manager()
    tags = {aws.TAG_PROJECT: "proj-sub", aws.TAG_CLUSTER: "cluster-2"}
    nm.providers["aws"] = TaggingAWSProvider(str(CLAP_PATH / "private"), tags)
    ids = nm.start_node(get_config_db().instance_descriptors["type-t2.medium"], count=1)
    node = nm.get_nodes_by_id(ids)[0]
    found = [i["InstanceId"] for i in aws.find_cluster_instances(ec2, "proj-sub", "cluster-2")]
    nm.stop_nodes(ids)
    out({"cloud": node.cloud_instance_id, "record_tags": node.extra["instance_tags"], "found": found,
         "after": live([node.cloud_instance_id])})
    """
    res = run_snippet(emulator, clap_path, body, timeout=240)
    assert res["found"] == [res["cloud"]]
    assert res["record_tags"][aws.TAG_PROJECT] == "proj-sub" and res["record_tags"]["CreatedWith"] == "CLAP"
    assert set(res["after"].values()) == {"terminated"}


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
def test_security_group_intra_group_rule(emulator: Ec2Emulator, clap_path: Path) -> None:
    body = """
    gid = ec2.create_security_group(GroupName="intra", Description="x")["GroupId"]
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}])
    before = aws.security_group_allows_intra_group_tcp(ec2, "intra")
    ec2.authorize_security_group_ingress(GroupId=gid, IpPermissions=[
        {"IpProtocol": "tcp", "FromPort": 0, "ToPort": 65535, "UserIdGroupPairs": [{"GroupId": gid}]}])
    after = aws.security_group_allows_intra_group_tcp(ec2, "intra")
    out([before, after, aws.security_group_allows_intra_group_tcp(ec2, "no-such-group")])
    """
    assert run_snippet(emulator, clap_path, body) == [False, True, None]


@needs_root
def test_check_credentials(tmp_path: Path) -> None:
    """moto accepts any key unless IAM auth is on; turn it on (moto-api/reset-auth) in a
    private emulator so a wrong key is really refused. boto3 only: with auth on, moto
    also checks signatures, and boto2's rewritten scope would not match its own."""
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
        return boto3.client("ec2", endpoint_url=os.environ["EC2_URL"], region_name="us-east-1",
                            aws_access_key_id=key_id, aws_secret_access_key=secret)
    def reset_auth(count):
        # text/plain: with urllib's default form type Flask hides the body from moto
        req = urllib.request.Request(os.environ["EC2_URL"] + "/moto-api/reset-auth", data=count.encode(),
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=5).read()
    res = {"any_key": msg(lambda: aws.check_credentials(ec2))}
    iam = aws.session_from_clap_config(CLAP_PATH, "aws-emu").client("iam", endpoint_url=os.environ["EC2_URL"])
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
        res["good"] = msg(lambda: aws.check_credentials(client(good_id, good_secret)))
        res["wrong_id"] = msg(lambda: aws.check_credentials(client("AKIAWRONGWRONGWRONG0", good_secret)))
        res["wrong_secret"] = msg(lambda: aws.check_credentials(client(good_id, "wrong-secret")))
        res["no_permission"] = msg(lambda: aws.check_credentials(client(np_id, np_secret)))
    finally:
        reset_auth("inf")
    # Nothing listens on port 9 in this namespace; one attempt keeps the test short
    # (ec2_client_from_clap_config retries 3 times, ~4 s here).
    from botocore.config import Config
    no_endpoint = aws.session_from_clap_config(CLAP_PATH, "aws-emu").client(
        "ec2", endpoint_url="http://127.0.0.1:9", config=Config(retries={"max_attempts": 1}))
    res["no_endpoint"] = msg(lambda: aws.check_credentials(no_endpoint))
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


def test_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_URL", raising=False)
    monkeypatch.setenv("EC2_URL", "http://127.0.0.1:1")
    assert aws.endpoint_url() == "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_URL", "http://127.0.0.1:2")  # wins, as in the amazon.aws modules
    assert aws.endpoint_url() == "http://127.0.0.1:2"


def test_hourly_cost() -> None:
    assert aws.hourly_cost("t2.medium", "us-east-1", 2) == pytest.approx(0.0928)
    assert aws.hourly_cost("t3.large", "us-east-1", 0) == 0
    with pytest.raises(aws.AwsError, match="no price for x1.huge in us-east-1"):
        aws.hourly_cost("x1.huge", "us-east-1", 1)
    with pytest.raises(ValueError):
        aws.hourly_cost("t2.micro", "us-east-1", -1)


# ------------------------------------------------------------------ the rules of a real account


def test_launched_by_matches_only_what_the_launch_asked_for() -> None:
    launch = aws.Launch("key-a", "ami-1", "t2.medium", since=1_000_000.0)
    cut_short = {"KeyName": "key-a", "ImageId": "ami-1", "InstanceType": "t2.medium", "LaunchTime": 1_000_010.0}
    assert aws.launched_by(cut_short, launch)
    assert aws.launched_by({**cut_short, "LaunchTime": 1_000_000.0 - aws.LAUNCH_CLOCK_SLACK_S}, launch)
    for other in ({"KeyName": "key-b"}, {"ImageId": "ami-2"}, {"InstanceType": "t2.small"},
                  {"LaunchTime": 1_000_000.0 - aws.LAUNCH_CLOCK_SLACK_S - 1},  # before this `up` began
                  {"Tags": [{"Key": aws.TAG_PROJECT, "Value": "dcgan-clap"}]}):  # tagged: the tag sweep's
        assert not aws.launched_by({**cut_short, **other}, launch), other


def test_an_ec2_refusal_becomes_one_sentence() -> None:
    from botocore.exceptions import ClientError

    import aws_nodes
    import output

    error = ClientError({"Error": {"Code": "UnauthorizedOperation",
                                   "Message": "You are not authorized.\nEncoded message: abc"}}, "CreateTags")
    assert aws.refusal(error) == ("EC2 CreateTags was refused (UnauthorizedOperation: You are not authorized. "
                                  "Encoded message: abc): grant your IAM user ec2:CreateTags (an admin of the "
                                  "account can)")
    with pytest.raises(output.UserError) as raised, aws_nodes.aws_errors("the nodes are recorded"):
        raise error
    assert str(raised.value).endswith("(an admin of the account can); the nodes are recorded.")


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


def test_aws_up_waits_for_a_slow_boot_and_each_answer_caps_the_lifetime(
        project: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import aws_nodes
    import cluster
    import config

    settings = config.load_settings({**project, "PROVIDER": "aws", "MAX_HOURS": "2"})
    assert settings.boot_timeout == 300  # the default: a fresh Ubuntu can take minutes
    nodes = FakeNodes({"fast": 0, "slow": 240, "never": float("inf")})
    monkeypatch.setattr(aws_nodes.time, "monotonic", lambda: nodes.now)
    monkeypatch.setattr(aws_nodes.time, "sleep", nodes.sleep)
    handles = cluster.Clap(None, nodes, None)
    state = {"created": time.time() - 30 * 60 + 30}  # `up` began 29.5 min ago: 90 of MAX_HOURS=2 left

    assert aws_nodes.wait_for_ssh(settings, handles, state, ["fast", "slow"]) == []
    assert nodes.calls[0] == (["fast", "slow"], {"retries": 1, "test_command": "sudo -n shutdown -h +90"})
    assert all(ids == ["slow"] for ids, _ in nodes.calls[1:])  # a node that answered is not asked again

    nodes.now, nodes.calls = 0.0, []
    assert aws_nodes.wait_for_ssh(settings, handles, state, ["fast", "never"]) == ["never"]
    assert 300 - aws_nodes.AWS_SSH_EVERY_S <= nodes.now <= 300  # given up at BOOT_TIMEOUT, not after 3 x 5 s

    local = config.load_settings({**project, "CONNECTION_TRIES": "3"})
    nodes.calls = []
    assert aws_nodes.wait_for_ssh(local, handles, state, ["never"]) == ["never"]
    assert nodes.calls == [(["never"], {"retries": 3, "wait_timeout": 5})]


def test_setup_and_up_agree_on_the_lifetime_cap(project: dict) -> None:
    import aws_nodes
    import config
    import role

    settings = config.load_settings({**project, "PROVIDER": "aws", "MAX_HOURS": "3"})
    state = {"created": time.time() - 60 * 60 + 30, "nodes": []}
    assert role.role_vars(settings, state, "setup")["shutdown_after_minutes"] == 120
    assert aws_nodes.lifetime_command(aws_nodes.lifetime_minutes(settings, state)) == "sudo -n shutdown -h +120"


def test_env_example_offers_the_efs_mount_target_address() -> None:
    """The EFS DNS name resolves only in zones with a mount target; its address works from every zone."""
    example = (ROOT / ".env.example").read_text()
    value = next(line.split("=", 1)[1] for line in example.splitlines() if line.startswith("# EFS_HOST="))
    ipaddress.ip_address(value)
