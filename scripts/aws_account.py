"""What EC2 says about the account before anything starts (`make check`, and `up` first): the
credentials, the key pair, the image, the security group, and whether each call `up` and `down`
make would be allowed (DryRun).

Each answers with a value or raises aws.AwsError / botocore's ClientError, which aws.aws_errors
turns into the one sentence the user sees.
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.client import BaseClient
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

import aws

# AWS's own syntax for an AMI named by a public SSM parameter (RunInstances accepts it too).
SSM_IMAGE = "resolve:ssm:"


def check_credentials(client: BaseClient) -> None:
    """One cheap call (DescribeRegions); raise aws.AwsError saying what to fix."""
    where = client.meta.endpoint_url
    try:
        client.describe_regions(RegionNames=[client.meta.region_name])
    except NoCredentialsError:
        raise aws.AwsError("no AWS credentials: fill the access/secret key files named in providers.yaml") from None
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError):
        raise aws.AwsError(f"cannot reach the EC2 endpoint {where}: check the network, the region or "
                       f"AWS_ENDPOINT_URL") from None
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in aws.AUTH_CODES:
            raise aws.AwsError(
                f"AWS rejected the credentials ({code}) at {where}: check the access_keyfile and "
                "secret_access_keyfile files (in CLAP_PATH/private) named by providers.yaml"
            ) from None
        if code in aws.DENIED_CODES:
            raise aws.AwsError(f"the credentials work but may not call EC2 ({code}): grant them EC2 "
                               "permissions") from None
        raise aws.AwsError(f"EC2 DescribeRegions failed at {where}: {code or e}") from None
    except BotoCoreError as e:
        raise aws.AwsError(f"EC2 call to {where} failed: {type(e).__name__}") from None


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
        return aws.client(session, "ssm").get_parameter(Name=name)["Parameter"]["Value"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "ParameterNotFound":
            raise aws.AwsError(f"the SSM parameter {name} does not exist in {session.region_name}: name an AMI "
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
        if code == "DryRunOperation" or code in aws.NOT_FOUND_CODES:
            return
        raise
