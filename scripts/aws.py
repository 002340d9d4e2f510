"""boto3 helpers for the AWS steps and our EC2 provider: credentials, images, the checks made
before anything starts, our tags, waits with deadlines, cost.

No CLAP import: these read CLAP's config files directly so that a step can
check or clean up even when CLAP is broken or its node records are gone.
aws_errors turns any failure of theirs into the one sentence the user sees.
Secrets are read from the key files and handed to boto3 only; no message
here contains them. The endpoint is botocore's own (AWS_ENDPOINT_URL, as the
tests' EC2 emulator sets it).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
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
    WaiterError,
)

from output import UserError

ROOT = Path(__file__).resolve().parent.parent
PRICES_FILE = ROOT / "clap_config" / "prices.yaml"

# Our own tags, namespaced so the sweep never matches somebody else's generic "Project" tag in a
# shared account. The owner is the checkout that started the instance (aws_launch.owner_id).
TAG_PROJECT = "ClapProject"
TAG_CLUSTER = "ClapClusterId"
TAG_OWNER = "ClapOwner"
# AWS's own syntax for an AMI named by a public SSM parameter (RunInstances accepts it too).
SSM_IMAGE = "resolve:ssm:"

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
_CLIENT_CONFIG = Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 3, "mode": "standard"})
WAIT_EVERY_S = 5  # seconds between two DescribeInstances while waiting for a state


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


def session_from_clap_config(clap_path: Path, provider_id: str) -> boto3.session.Session:
    """A boto3 session with the keys and region CLAP's provider `provider_id` uses."""
    entry = provider_config(clap_path, provider_id)
    private = clap_path / "private"
    return boto3.session.Session(
        aws_access_key_id=_read_key(private, entry["access_keyfile"], "access key"),
        aws_secret_access_key=_read_key(private, entry["secret_access_keyfile"], "secret key"),
        region_name=str(entry["region"]),
    )


def client(session: boto3.session.Session, service: str) -> BaseClient:
    """A client of `service` (ec2, ssm) with short timeouts and few retries."""
    return session.client(service, config=_CLIENT_CONFIG)


def ec2_client_from_clap_config(clap_path: Path, provider_id: str) -> BaseClient:
    """EC2 client for `provider_id`."""
    return client(session_from_clap_config(clap_path, provider_id), "ec2")


def check_credentials(client: BaseClient) -> None:
    """One cheap call (DescribeRegions); raise AwsError saying what to fix."""
    where = client.meta.endpoint_url
    try:
        client.describe_regions(RegionNames=[client.meta.region_name])
    except NoCredentialsError:
        raise AwsError("no AWS credentials: fill the access/secret key files named in providers.yaml") from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError):
        raise AwsError(f"cannot reach the EC2 endpoint {where}: check the network, the region or "
                       f"AWS_ENDPOINT_URL") from None
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


@contextmanager
def aws_errors(then: str = "") -> Iterator[None]:
    """Any failed EC2 call inside becomes the one sentence the user sees, plus what `then` says."""
    try:
        yield
    except ClientError as error:
        message = refusal(error)
    except BotoCoreError as error:
        message = f"an EC2 call failed ({error})"
    except AwsError as error:
        message = str(error)
    else:
        return
    raise UserError(f"{message}{'; ' + then if then else ''}.")


def _describe(client: BaseClient, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    pages = client.get_paginator("describe_instances").paginate(Filters=filters)
    return [inst for page in pages for res in page["Reservations"] for inst in res["Instances"]]


def find_cluster_instances(
    client: BaseClient,
    project: str,
    owner: str | None = None,
    cluster_id: str | None = None,
    states: Iterable[str] = LIVE_STATES,
) -> list[dict[str, Any]]:
    """Instances carrying our project tag (and owner, cluster tags if given), in `states`.

    Found by tag, not by CLAP's records, so this also finds instances whose
    record was lost.
    """
    filters = [{"Name": "instance-state-name", "Values": list(states)},
               {"Name": f"tag:{TAG_PROJECT}", "Values": [project]}]
    for key, value in ((TAG_OWNER, owner), (TAG_CLUSTER, cluster_id)):
        if value is not None:
            filters.append({"Name": f"tag:{key}", "Values": [value]})
    return _describe(client, filters)


def tags_of(instance: dict[str, Any]) -> dict[str, str]:
    return {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}


def describe(client: BaseClient, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The instances of these ids that EC2 still knows, by id: an id it has forgotten (a terminated
    instance vanishes after about an hour) is simply absent. A filter, unlike InstanceIds=, does not
    fail the whole call (InvalidInstanceID.NotFound) on an unknown id."""
    ids = sorted(set(ids))
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(ids), 100):
        for inst in _describe(client, [{"Name": "instance-id", "Values": ids[i : i + 100]}]):
            out[inst["InstanceId"]] = inst
    return out


def _states(client: BaseClient, ids: list[str]) -> dict[str, str]:
    return {iid: inst["State"]["Name"] for iid, inst in describe(client, ids).items()}


def wait_running(client: BaseClient, ids: Sequence[str], timeout: float) -> list[dict[str, Any]]:
    """Wait until every instance runs, at most `timeout` seconds; returns them as EC2 describes them.

    Raises AwsError naming the instances and their states when the deadline passes or one of
    them ends instead (say, a spot request EC2 could not fill)."""
    waiter = client.get_waiter("instance_running")
    try:
        waiter.wait(InstanceIds=list(ids),
                    WaiterConfig={"Delay": WAIT_EVERY_S, "MaxAttempts": max(1, math.ceil(timeout / WAIT_EVERY_S))})
    except WaiterError:
        found = describe(client, ids)
        states = ", ".join(f"{iid} {state_words(found.get(iid))}" for iid in ids)
        raise AwsError(f"the instances did not all reach `running` (waited up to {timeout:.0f} s): {states}") from None
    found = describe(client, ids)
    return [found[iid] for iid in ids]


def state_words(instance: dict[str, Any] | None) -> str:
    """An instance's state as the user reads it, with EC2's reason (a reclaimed spot instance...)."""
    if instance is None:
        return "gone (EC2 no longer knows it)"
    reason = instance.get("StateReason", {}).get("Message")
    return instance["State"]["Name"] + (f" ({reason})" if reason else "")


def terminate_and_wait(client: BaseClient, instance_ids: Sequence[str], timeout: float) -> None:
    """Terminate instances and wait until none is left alive.

    Unknown and already-terminated ids count as done. Raises AwsError
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
            raise AwsError(f"instances not terminated after {timeout:.0f} s: {still}")
        time.sleep(min(pause, left))
        pause = min(pause * 2, 10.0)


def _covers_all_tcp(perm: dict[str, Any]) -> bool:
    if perm.get("IpProtocol") == "-1":
        return True
    return perm.get("IpProtocol") == "tcp" and perm.get("FromPort", 0) <= 0 and perm.get("ToPort", 0) >= 65535


def groups_closed_to_members(client: BaseClient, group_name: str) -> list[str] | None:
    """The ids of the security groups named `group_name` whose members cannot reach each other on
    every TCP port (gloo opens random ports); None if there is no such group.

    An all-TCP inbound rule whose source is the group itself or 0.0.0.0/0 opens them. CLAP's own
    group template opens only 22/80/443. With several groups of that name (one per VPC) each
    must have it.
    """
    groups = client.describe_security_groups(Filters=[{"Name": "group-name", "Values": [group_name]}])["SecurityGroups"]
    if not groups:
        return None

    def open_to_members(group: dict[str, Any]) -> bool:
        for perm in group.get("IpPermissions", []):
            if not _covers_all_tcp(perm):
                continue
            if any(p.get("GroupId") == group["GroupId"] for p in perm.get("UserIdGroupPairs", [])):
                return True
            if any(r.get("CidrIp") == "0.0.0.0/0" for r in perm.get("IpRanges", [])):
                return True
        return False

    return [group["GroupId"] for group in groups if not open_to_members(group)]


def key_pair_exists(client: BaseClient, name: str) -> bool:
    try:
        return bool(client.describe_key_pairs(KeyNames=[name])["KeyPairs"])
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "InvalidKeyPair.NotFound":
            return False
        raise


def resolve_image(session: boto3.session.Session, image_id: str) -> str:
    """An AMI id: `resolve:ssm:<parameter>` (AWS's syntax) is read from that public SSM parameter,
    such as Canonical's current Ubuntu LTS; anything else is the AMI id itself."""
    if not image_id.startswith(SSM_IMAGE):
        return image_id
    name = image_id[len(SSM_IMAGE):]
    try:
        return client(session, "ssm").get_parameter(Name=name)["Parameter"]["Value"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "ParameterNotFound":
            raise AwsError(f"the SSM parameter {name} does not exist in {session.region_name}: name an AMI "
                           f"(image_id) of that region in the template instead") from None
        raise


def find_image(client: BaseClient, ami: str) -> dict[str, Any] | None:
    """The AMI as EC2 describes it (RootDeviceName, Name...), or None if the region has no such AMI."""
    try:
        images = client.describe_images(ImageIds=[ami])["Images"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("InvalidAMIID.NotFound", "InvalidAMIID.Malformed",
                                                            "InvalidAMIID.Unavailable"):
            return None
        raise
    return images[0] if images else None


def dry_run(client: BaseClient, operation: str, **params: Any) -> None:
    """Ask EC2 whether the call would be allowed, doing nothing (DryRun). Returns when EC2 says
    it would succeed; raises the ClientError it refuses with (UnauthorizedOperation...).

    A made-up instance id (for CreateTags or TerminateInstances before any instance exists)
    may be answered with InvalidInstanceID.NotFound, which says nothing against the permission:
    that passes too."""
    try:
        getattr(client, operation)(DryRun=True, **params)
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code == "DryRunOperation" or code in _NOT_FOUND_CODES:
            return
        raise


def spot_price(client: BaseClient, instance_type: str) -> float | None:
    """The current Linux spot price of `instance_type`, USD per hour: the highest of the region's
    availability zones (the zone is EC2's choice); None when EC2 gives none."""
    history = client.describe_spot_price_history(InstanceTypes=[instance_type], StartTime=time.time(),
                                                 ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"])
    latest: dict[str, float] = {}
    for entry in sorted(history["SpotPriceHistory"], key=lambda e: e["Timestamp"]):
        latest[entry["AvailabilityZone"]] = float(entry["SpotPrice"])
    return max(latest.values()) if latest else None


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
