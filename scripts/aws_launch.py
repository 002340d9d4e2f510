"""What every EC2 instance of this project is launched with, CLAP-free (`make check` asks EC2
about the very request `up` sends, before CLAP is even imported): this checkout's owner id, the
tags, the lifetime cap as user data, and the one RunInstances request (see aws_provider)."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aws
import aws_account
from cluster_state import PROJECT
from config import Settings
from output import UserError

OWNER_FILE = ".owner"
_OWNER_FORMAT = re.compile(r"o-[0-9a-f]{16}")


def owner_id(settings: Settings, create: bool = False) -> str | None:
    """This checkout's id, tagged on every instance it starts: `status` and `down` act on the
    instances that carry it, and only list other checkouts' (a course's shared account). Kept
    beside nodes.json, not in it: it outlives every cluster. None until the first `up` makes it."""
    path = settings.nodes_file.with_name(OWNER_FILE)
    if not path.exists() and create:
        tmp = path.with_name(f"{OWNER_FILE}.{os.getpid()}.tmp")
        tmp.write_text(f"o-{uuid.uuid4().hex[:16]}\n")
        try:
            os.link(tmp, path)  # atomic, and never over an id another command wrote first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        owner = path.read_text().strip()
    except FileNotFoundError:
        return None
    if not _OWNER_FORMAT.fullmatch(owner):
        raise UserError(f"{path} holds {owner!r}, not this checkout's id (o- and 16 hex digits): restore it "
                        f"(the id is the ClapOwner tag of its instances in the EC2 console).")
    return owner


@dataclass(frozen=True)
class Launch:
    """What every instance of one cluster is started with, whatever its template."""

    tags: dict[str, str]
    ends_at: float  # epoch seconds: MAX_HOURS after `up` began, the node shuts down, and so terminates
    market: str  # on-demand or spot
    spot_max_price: str  # USD per hour; empty: EC2's default, the on-demand price


def launch_for(settings: Settings, state: dict, owner: str) -> Launch:
    tags = {aws.TAG_PROJECT: PROJECT, aws.TAG_CLUSTER: state["cluster_id"], aws.TAG_OWNER: owner,
            "Name": f"{PROJECT}-{state['cluster_id']}"}
    return Launch(tags, state["created"] + settings.max_hours * 3600, settings.market, settings.spot_max_price)


def user_data(ends_at: float) -> str:
    """The script cloud-init runs once, at the node's first boot: the node schedules its own shutdown
    (which terminates it) for `ends_at`, whether or not anything ever connects to it. The minutes are
    counted on the node, so a slow boot does not push the end back."""
    return ("#!/bin/sh\n"
            f"minutes=$(( ({int(ends_at)} - $(date +%s)) / 60 ))\n"
            '[ "$minutes" -ge 1 ] || minutes=1\n'
            'shutdown -h "+$minutes"\n')


def security_groups(client: Any, template: Mapping[str, Any]) -> dict[str, list[str]]:
    """The launch's security group, as RunInstances takes it: by name in the default VPC; by id in the
    template's subnet (network_ids), since EC2 looks a name up in the default VPC only."""
    group, subnets = template.get("security_group"), template.get("network_ids") or []
    if not group:
        return {}
    if not subnets:
        return {"SecurityGroups": [group]}
    vpc = client.describe_subnets(SubnetIds=subnets[:1])["Subnets"][0]["VpcId"]
    found = client.describe_security_groups(Filters=[{"Name": "group-name", "Values": [group]},
                                                     {"Name": "vpc-id", "Values": [vpc]}])["SecurityGroups"]
    if not found:
        raise aws.AwsError(f"no security group {group} in {vpc}, the VPC of subnet {subnets[0]} (network_ids of "
                           f"{template['flavor']} in instances.yaml): create it there with an all-TCP rule from the "
                           f"group itself, or name a group of that VPC")
    return {"SecurityGroupIds": [found[0]["GroupId"]]}


def run_request(launch: Launch, template: Mapping[str, Any], key_name: str, image: Mapping[str, Any],
                count: int, groups: Mapping[str, list[str]]) -> dict[str, Any]:
    """The one RunInstances request that starts `count` nodes of `template` (instances.yaml's keys)
    from `image` (as DescribeImages gives it), in `groups` (as security_groups names them).
    `make check` sends the same request with DryRun."""
    tags = [{"Key": key, "Value": value} for key, value in launch.tags.items()]
    request: dict[str, Any] = {
        "ImageId": image["ImageId"], "InstanceType": template["flavor"], "KeyName": key_name,
        "MinCount": count, "MaxCount": count,
        "InstanceInitiatedShutdownBehavior": "terminate",
        "UserData": user_data(launch.ends_at),
        "TagSpecifications": [{"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")],
        "ClientToken": uuid.uuid4().hex,  # botocore retries a timed-out call: EC2 starts the nodes once
    }
    request.update(groups)
    subnets = template.get("network_ids") or []
    if len(subnets) > 1:
        raise aws.AwsError(f"the instances.yaml template of {template['flavor']} lists {len(subnets)} network_ids "
                           f"({', '.join(subnets)}): name the one subnet its nodes start in.")
    if subnets:  # the nodes' subnet (a VPN or bastion reaches their private addresses); else the default VPC's
        request["SubnetId"] = subnets[0]
    if template.get("boot_disk_size"):
        request["BlockDeviceMappings"] = [{
            "DeviceName": template.get("boot_disk_device") or image["RootDeviceName"],
            "Ebs": {"VolumeSize": int(template["boot_disk_size"]), "DeleteOnTermination": True,
                    "VolumeType": template.get("boot_disk_type") or "gp3"}}]
    if launch.market == "spot":
        options = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
        if launch.spot_max_price:
            options["MaxPrice"] = launch.spot_max_price
        request["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
    return request


def image_of(session: Any, client: Any, image_id: str) -> dict[str, Any]:
    """The template's image (an AMI id, or AWS's resolve:ssm:<parameter>) as EC2 describes it."""
    ami = aws_account.resolve_image(session, image_id)
    image = aws_account.find_image(client, ami)
    if image is None:
        raise aws.AwsError(f"the AMI {ami} (image_id {image_id}) does not exist in {session.region_name}: "
                           f"name an AMI of that region in the template")
    return image
