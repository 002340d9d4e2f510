"""CLAP provider `aws`: EC2 instances started, watched and terminated with boto3.

Registered into CLAP's NodeManager by cluster.clap() in place of CLAP's own provider (CLAP itself
is unchanged; instances.yaml, providers.yaml and logins.yaml describe the nodes as before).
CLAP's provider played Ansible's old `ec2` module, which needs boto (boto2: it does not import on
Python 3.12 or newer) and the ansible 6.7.0 bundle, and tagged its instances only after waiting
for them. Here one RunInstances call carries everything promised at launch, so no instance
exists untagged or uncapped even if `up` dies the next second:
  - our tags: project, cluster and this checkout's owner id (`status` and `down` find instances
    by them, and act on this checkout's only);
  - shutdown behaviour `terminate`, and user data with which the node schedules its own
    shutdown at first boot, MAX_HOURS after `up` began;
  - the root volume (the template's boot_disk_size, gp3), and MARKET=spot's market options.
"""

from __future__ import annotations

import copy
import time
import uuid
from dataclasses import asdict
from typing import Any

from clap.abstract_provider import AbstractInstanceProvider, InstanceDeploymentError
from clap.configs import InstanceInfo
from clap.node import NodeDescriptor, NodeLifecycle, NodeStatus, NodeType

import aws
from aws import aws_errors
from aws_launch import image_of, launch_for, owner_id, run_request, security_groups
from config import Settings

# What CLAP makes of EC2's states; an instance EC2 no longer knows is STOPPED (gone) as well.
_STATUS = {"pending": NodeStatus.UNKNOWN, "running": NodeStatus.STARTED, "stopping": NodeStatus.PAUSED,
           "stopped": NodeStatus.PAUSED, "shutting-down": NodeStatus.STOPPED, "terminated": NodeStatus.STOPPED}


class AwsProvider(AbstractInstanceProvider):
    provider = "aws"

    def __init__(self, settings: Settings, state: dict | None) -> None:
        self.settings = settings
        self.state = state  # the cluster new nodes join; None where nothing is started (status, down)

    def _session(self, provider_id: str) -> Any:
        return aws.session_from_clap_config(self.settings.clap_path, provider_id)

    def start_instances(self, instance: InstanceInfo, count: int, timeout: int = 600) -> list[NodeDescriptor]:
        if self.state is None:
            raise InstanceDeploymentError("no cluster to start nodes for: `make up` makes one.")
        launch = launch_for(self.settings, self.state, owner_id(self.settings, create=True))
        with aws_errors("nothing was started"):
            session = self._session(instance.provider.provider_config_id)
            client = aws.client(session, "ec2")
            image = image_of(session, client, instance.instance.image_id)
            template = asdict(instance.instance)
            request = run_request(launch, template, instance.login.keypair_name, image, count,
                                  security_groups(client, template))
            ids = [i["InstanceId"] for i in client.run_instances(**request)["Instances"]]
        with aws_errors(f"{', '.join(ids)} carry the cluster's tags and end by themselves after MAX_HOURS="
                        f"{self.settings.max_hours:g} h: `make down` terminates them"):
            running = aws.wait_running(client, ids, timeout)
        now = time.time()
        return [
            NodeDescriptor(
                node_id=uuid.uuid4().hex, configuration=instance, nickname=found["InstanceId"],
                ip=found.get("PublicIpAddress") or found.get("PrivateIpAddress"), type=NodeType.TYPE_CLOUD,
                cloud_instance_id=found["InstanceId"], status=NodeStatus.STARTED, creation_time=now, update_time=now,
                cloud_lifecycle=NodeLifecycle.PREEMPTIBLE if launch.market == "spot" else NodeLifecycle.NORMAL,
                extra={"private_ip": found.get("PrivateIpAddress"), "image_id": image["ImageId"],
                       "availability_zone": found.get("Placement", {}).get("AvailabilityZone"),
                       "instance_tags": aws.tags_of(found)},
            )
            for found in running
        ]

    def update_instance_info(self, nodes_to_check: list[NodeDescriptor], timeout: int = 600) -> list[NodeDescriptor]:
        checked = []
        for provider_id, nodes in _by_provider(nodes_to_check).items():
            with aws_errors():
                found = aws.describe(aws.client(self._session(provider_id), "ec2"),
                                     [node.cloud_instance_id for node in nodes])
            for node in nodes:
                node = copy.deepcopy(node)
                instance = found.get(node.cloud_instance_id)
                node.status = _STATUS.get(instance["State"]["Name"], NodeStatus.UNKNOWN) if instance \
                    else NodeStatus.STOPPED
                node.update_time = time.time()
                checked.append(node)
        return checked

    def stop_instances(self, nodes_to_stop: list[NodeDescriptor], timeout: int = 600) -> list[NodeDescriptor]:
        stopped = []
        for provider_id, nodes in _by_provider(nodes_to_stop).items():
            with aws_errors("they stay recorded: run `make down` again"):
                aws.terminate_and_wait(aws.client(self._session(provider_id), "ec2"),
                                       [node.cloud_instance_id for node in nodes], timeout)
            for node in nodes:
                node = copy.deepcopy(node)
                node.status, node.ip = NodeStatus.STOPPED, None
                stopped.append(node)
        return stopped

    def pause_instances(self, nodes_to_pause: list[NodeDescriptor], timeout: int = 600) -> list[NodeDescriptor]:
        raise InstanceDeploymentError("EC2 nodes of this project are not paused: `make down` terminates them.")

    def resume_instances(self, nodes_to_resume: list[NodeDescriptor], timeout: int = 600) -> list[NodeDescriptor]:
        raise InstanceDeploymentError("EC2 nodes of this project are not paused or resumed.")


def _by_provider(nodes: list[NodeDescriptor]) -> dict[str, list[NodeDescriptor]]:
    """Nodes by their providers.yaml entry: each has its own keys and region."""
    groups: dict[str, list[NodeDescriptor]] = {}
    for node in nodes:
        groups.setdefault(node.configuration.provider.provider_config_id, []).append(node)
    return groups
