"""Small boto3 helpers for the AWS steps: credentials, our tags, orphan sweep, cost.

No CLAP import: these read CLAP's config files directly so that a step can
check or clean up even when CLAP is broken or its node records are gone.
Secrets are read from the key files and handed to boto3 only; no message
here contains them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import yaml
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

ROOT = Path(__file__).resolve().parent.parent
PRICES_FILE = ROOT / "clap_config" / "prices.yaml"

# Our own tags, namespaced so the orphan sweep never matches somebody else's
# generic "Project" tag in a shared account.
TAG_PROJECT = "ClapProject"
TAG_CLUSTER = "ClapClusterId"

LIVE_STATES: tuple[str, ...] = ("pending", "running", "stopping", "stopped")

_AUTH_CODES = {
    "AuthFailure",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "InvalidAccessKeyId",
    "IncompleteSignature",
}
_DENIED_CODES = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"}
_NOT_FOUND_CODES = {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"}
# Real AWS is eventually consistent: a just-launched id may be unknown for a moment.
_TAG_RETRIES = 5
# How far this machine's clock may be off AWS's when matching an untagged instance to its `up`.
LAUNCH_CLOCK_SLACK_S = 60


class AwsError(RuntimeError):
    """A one-line message meant for the user: what is wrong and what to fix."""


def _clap_path_file(base: Path, name: str) -> Path:
    # Same resolution as CLAP's path_extend: ~ and $VARS expanded, absolute names kept.
    return Path(os.path.expandvars(os.path.expanduser(os.path.join(base, name))))


def provider_config(clap_path: Path, provider_id: str) -> dict[str, Any]:
    """The `provider_id` entry of $CLAP_PATH/configs/providers.yaml (must be an aws one)."""
    providers_file = clap_path / "configs" / "providers.yaml"
    try:
        providers = yaml.safe_load(providers_file.read_text()) or {}
    except OSError as e:
        raise AwsError(f"cannot read {providers_file}: {e.strerror}") from None
    entry = providers.get(provider_id)
    if not isinstance(entry, dict) or entry.get("provider") != "aws":
        raise AwsError(f"{providers_file} has no aws provider named {provider_id!r}")
    missing = [k for k in ("region", "access_keyfile", "secret_access_keyfile") if not entry.get(k)]
    if missing:
        # CLAP would silently parse such an entry as a `local` provider.
        raise AwsError(f"provider {provider_id!r} in {providers_file} lacks {', '.join(missing)}")
    return entry


def _read_key(private: Path, name: str, what: str) -> str:
    path = _clap_path_file(private, name)
    try:
        value = path.read_text().strip()
    except OSError as e:
        raise AwsError(f"cannot read the {what} file {path}: {e.strerror}") from None
    if not value:
        raise AwsError(f"the {what} file {path} is empty")
    return value


def endpoint_url() -> str | None:
    """The endpoint CLAP's Ansible modules use: AWS_URL, then EC2_URL (their precedence)."""
    return os.environ.get("AWS_URL") or os.environ.get("EC2_URL") or None


def session_from_clap_config(clap_path: Path, provider_id: str) -> boto3.session.Session:
    """A boto3 session with the keys and region CLAP's provider `provider_id` uses."""
    entry = provider_config(clap_path, provider_id)
    private = clap_path / "private"
    return boto3.session.Session(
        aws_access_key_id=_read_key(private, entry["access_keyfile"], "access key"),
        aws_secret_access_key=_read_key(private, entry["secret_access_keyfile"], "secret key"),
        region_name=str(entry["region"]),
    )


def ec2_client_from_clap_config(clap_path: Path, provider_id: str) -> BaseClient:
    """EC2 client for `provider_id`, at EC2_URL when set; short timeouts, few retries."""
    session = session_from_clap_config(clap_path, provider_id)
    config = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
    return session.client("ec2", endpoint_url=endpoint_url(), config=config)


def check_credentials(client: BaseClient) -> None:
    """One cheap call (DescribeRegions); raise AwsError saying what to fix."""
    where = client.meta.endpoint_url
    try:
        client.describe_regions(RegionNames=[client.meta.region_name])
    except NoCredentialsError:
        raise AwsError("no AWS credentials: fill the access/secret key files named in providers.yaml") from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError):
        raise AwsError(f"cannot reach the EC2 endpoint {where}: check the network, the region or EC2_URL") from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in _AUTH_CODES:
            raise AwsError(
                f"AWS rejected the credentials ({code}) at {where}: check the access_keyfile and "
                "secret_access_keyfile files (in CLAP_PATH/private) named by providers.yaml"
            ) from None
        if code in _DENIED_CODES:
            raise AwsError(f"the credentials work but may not call EC2 ({code}): grant them EC2 permissions") from None
        raise AwsError(f"EC2 DescribeRegions failed at {where}: {code or e}") from None
    except BotoCoreError as e:
        raise AwsError(f"EC2 call to {where} failed: {type(e).__name__}") from None


def refusal(error: ClientError) -> str:
    """One sentence for an EC2 call AWS refused: which call, AWS's code and words, what to do."""
    details = error.response.get("Error", {})
    code = details.get("Code", "") or "error"
    words = " ".join(str(details.get("Message", "")).split())  # one line, whatever AWS sent
    operation = error.operation_name
    if code in _DENIED_CODES:
        fix = f"grant your IAM user ec2:{operation} (an admin of the account can)"
    elif code in _AUTH_CODES:
        fix = "check the access_keyfile and secret_access_keyfile files (in CLAP_PATH/private) named by providers.yaml"
    else:
        fix = "fix what AWS names, or see the EC2 console"
    return f"EC2 {operation} was refused ({code}{': ' + words if words else ''}): {fix}"


def tag_instances(client: BaseClient, instance_ids: Sequence[str], project: str, cluster_id: str) -> None:
    """Put our project and cluster tags on instances (e.g. the cloud ids CLAP just started)."""
    if not instance_ids:
        return
    tags = [{"Key": TAG_PROJECT, "Value": project}, {"Key": TAG_CLUSTER, "Value": cluster_id}]
    for attempt in range(_TAG_RETRIES):
        try:
            client.create_tags(Resources=list(instance_ids), Tags=tags)
            return
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            if code != "InvalidInstanceID.NotFound" or attempt == _TAG_RETRIES - 1:
                raise
            time.sleep(1 + attempt)


def _describe(client: BaseClient, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pages = client.get_paginator("describe_instances").paginate(Filters=filters)
    return [inst for page in pages for res in page["Reservations"] for inst in res["Instances"]]


def find_cluster_instances(
    client: BaseClient,
    project: str,
    cluster_id: str | None = None,
    states: Iterable[str] = LIVE_STATES,
) -> list[dict[str, Any]]:
    """Instances carrying our project tag (and cluster tag if given), in `states`.

    Found by tag, not by CLAP's records, so this also finds orphans whose
    record was deleted.
    """
    filters = [{"Name": "instance-state-name", "Values": list(states)},
               {"Name": f"tag:{TAG_PROJECT}", "Values": [project]}]
    if cluster_id is not None:
        filters.append({"Name": f"tag:{TAG_CLUSTER}", "Values": [cluster_id]})
    return _describe(client, filters)


@dataclass(frozen=True)
class Launch:
    """What one `up` asked EC2 for: its key pair, AMI and type, and when (epoch seconds)."""

    key_name: str
    image_id: str
    instance_type: str
    since: float


def launched_by(instance: dict[str, Any], launch: Launch) -> bool:
    """Whether an instance without our tags is one that `launch` started.

    The `ec2` module tags only after its wait for `running`: a start cut short
    (Ctrl-C, timeout) leaves instances with no tag of ours and no CLAP record.
    They match the launch's key pair, AMI and type and were launched after it
    began; LAUNCH_CLOCK_SLACK_S allows for this machine's clock differing from AWS's.
    """
    launched = instance["LaunchTime"]
    launched = launched.timestamp() if hasattr(launched, "timestamp") else float(launched)
    return (
        TAG_PROJECT not in {tag["Key"] for tag in instance.get("Tags", [])}
        and instance.get("KeyName") == launch.key_name
        and instance.get("ImageId") == launch.image_id
        and instance.get("InstanceType") == launch.instance_type
        and launched >= launch.since - LAUNCH_CLOCK_SLACK_S
    )


def find_untagged_launches(client: BaseClient, launch: Launch) -> list[dict[str, Any]]:
    """Live instances that `launch` started but never tagged (see launched_by)."""
    filters = [
        {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
        {"Name": "key-name", "Values": [launch.key_name]},
        {"Name": "image-id", "Values": [launch.image_id]},
        {"Name": "instance-type", "Values": [launch.instance_type]},
    ]
    return [instance for instance in _describe(client, filters) if launched_by(instance, launch)]


def _states(client: BaseClient, ids: list[str]) -> dict[str, str]:
    # A filter, unlike InstanceIds=, does not fail the whole call on an unknown id.
    out: dict[str, str] = {}
    for i in range(0, len(ids), 100):
        for inst in _describe(client, [{"Name": "instance-id", "Values": ids[i : i + 100]}]):
            out[inst["InstanceId"]] = inst["State"]["Name"]
    return out


def terminate_and_wait(client: BaseClient, instance_ids: Sequence[str], timeout: float) -> None:
    """Terminate instances and wait until none is left alive.

    Unknown and already-terminated ids count as done. Raises TimeoutError
    naming the instances still alive at the deadline.
    """
    ids = sorted(set(instance_ids))
    if not ids:
        return
    deadline = time.monotonic() + timeout
    alive = {i: s for i, s in _states(client, ids).items() if s != "terminated"}
    to_terminate = [i for i, s in alive.items() if s != "shutting-down"]
    if to_terminate:
        try:
            client.terminate_instances(InstanceIds=to_terminate)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code", "") not in _NOT_FOUND_CODES:
                raise
            # One vanished between the two calls: terminate the rest one by one.
            for iid in to_terminate:
                try:
                    client.terminate_instances(InstanceIds=[iid])
                except ClientError as e2:
                    if e2.response.get("Error", {}).get("Code", "") not in _NOT_FOUND_CODES:
                        raise
    pause = 1.0
    while alive:
        alive = {i: s for i, s in _states(client, list(alive)).items() if s != "terminated"}
        if not alive:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            still = ", ".join(f"{i} ({s})" for i, s in sorted(alive.items()))
            raise TimeoutError(f"instances not terminated after {timeout:.0f} s: {still}")
        time.sleep(min(pause, left))
        pause = min(pause * 2, 10.0)


def _covers_all_tcp(perm: dict[str, Any]) -> bool:
    if perm.get("IpProtocol") == "-1":
        return True
    return perm.get("IpProtocol") == "tcp" and perm.get("FromPort", 0) <= 0 and perm.get("ToPort", 0) >= 65535


def security_group_allows_intra_group_tcp(client: BaseClient, group_name: str) -> bool | None:
    """Whether members of the group can reach each other on every TCP port; None if no such group.

    CLAP's own group template opens only 22/80/443 from anywhere, which is not
    enough for nodes that talk to each other (e.g. a rendezvous port).  True
    when an all-TCP rule names the group itself or 0.0.0.0/0; with several
    groups of that name (one per VPC) all must allow it.
    """
    groups = client.describe_security_groups(Filters=[{"Name": "group-name", "Values": [group_name]}])["SecurityGroups"]
    if not groups:
        return None

    def allows(group: dict[str, Any]) -> bool:
        for perm in group.get("IpPermissions", []):
            if not _covers_all_tcp(perm):
                continue
            if any(p.get("GroupId") == group["GroupId"] for p in perm.get("UserIdGroupPairs", [])):
                return True
            if any(r.get("CidrIp") == "0.0.0.0/0" for r in perm.get("IpRanges", [])):
                return True
        return False

    return all(allows(g) for g in groups)


def hourly_cost(instance_type: str, region: str, count: int, prices_file: Path = PRICES_FILE) -> float:
    """On-demand Linux USD per hour for `count` instances, from clap_config/prices.yaml."""
    if count < 0:
        raise ValueError(f"count must be >= 0, not {count}")
    table = yaml.safe_load(prices_file.read_text()) or {}
    try:
        price = float(table["regions"][region][instance_type])
    except (KeyError, TypeError):
        raise AwsError(f"no price for {instance_type} in {region}: add it to {prices_file}") from None
    return round(price * count, 6)
