"""boto3 helpers for the AWS steps and our EC2 provider: sessions and clients, errors as one
sentence, our tags, the instances and waits with deadlines, cost. What `make check` asks EC2
before anything starts is in aws_account.

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

LIVE_STATES: tuple[str, ...] = ("pending", "running", "stopping", "stopped")

AUTH_CODES = {
    "AuthFailure",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "UnrecognizedClientException",
    "InvalidAccessKeyId",
    "IncompleteSignature",
}
DENIED_CODES = {"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"}
NOT_FOUND_CODES = {"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"}
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


def refusal(error: ClientError) -> str:
    """One sentence for an EC2 call AWS refused: which call, AWS's code and words, what to do."""
    details = error.response.get("Error", {})
    code = details.get("Code", "") or "error"
    words = " ".join(str(details.get("Message", "")).split())  # one line, whatever AWS sent
    operation = error.operation_name
    if code in DENIED_CODES:
        fix = f"grant your IAM user ec2:{operation} (an admin of the account can)"
    elif code in AUTH_CODES:
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
            if e.response.get("Error", {}).get("Code", "") not in NOT_FOUND_CODES:
                raise
            # One vanished between the two calls: terminate the rest one by one.
            for iid in to_terminate:
                try:
                    client.terminate_instances(InstanceIds=[iid])
                except ClientError as e2:
                    if e2.response.get("Error", {}).get("Code", "") not in NOT_FOUND_CODES:
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
