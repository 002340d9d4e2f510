"""The nodes on EC2: our tags on them, their lifetime cap (MAX_HOURS), the wait for them to answer
SSH, their termination, their bill and the sweep of every instance of the cluster.

aws.py (boto3) is imported inside the functions that call EC2: a local step does not pay the
0.6 s its import takes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from clap_configs import aws_template, read_yaml
from cluster import Clap
from cluster_state import PROJECT, write_state
from config import Settings
from output import UserError, say, warn

AWS_SSH_EVERY_S = 10  # seconds between two SSH attempts on a booting EC2 node


@contextmanager
def aws_errors(then: str = "") -> Iterator[None]:
    """Any failed EC2 call inside becomes the one sentence the user sees, plus what `then` says."""
    import aws

    try:
        yield
    except aws.ClientError as error:
        message = aws.refusal(error)
    except aws.BotoCoreError as error:
        message = f"an EC2 call failed ({error})"
    except aws.AwsError as error:
        message = str(error)
    else:
        return
    raise UserError(f"{message}{'; ' + then if then else ''}.")


def aws_client(settings: Settings) -> Any:
    import aws

    with aws_errors():
        return aws.ec2_client_from_clap_config(settings.clap_path, aws_template(settings)[0]["provider"])


def adopt_instances(settings: Settings, state: dict, cloud_ids: list[str]) -> None:
    """Tag the instances as ours (so `status`/`down` find them without any record) and make
    them terminate, not stop, when they shut down (MAX_HOURS)."""
    import aws

    client = aws_client(settings)
    with aws_errors("the nodes are recorded: `make down` terminates them"):
        aws.tag_instances(client, cloud_ids, PROJECT, state["cluster_id"])
        for cloud_id in cloud_ids:
            client.modify_instance_attribute(InstanceId=cloud_id, Attribute="instanceInitiatedShutdownBehavior",
                                             Value="terminate")


def lifetime_minutes(settings: Settings, state: dict) -> int:
    """Minutes until MAX_HOURS after `up` began (at least 1): when each node shuts itself down."""
    return max(1, int(settings.max_hours * 60 - (time.time() - state["created"]) / 60))


def lifetime_command(minutes: int) -> str:
    """A node's own shutdown, in `minutes`; on EC2 adopt_instances makes a shutdown terminate."""
    return f"sudo -n shutdown -h +{minutes}"


def wait_for_ssh(settings: Settings, handles: Clap, state: dict, ids: list[str]) -> list[str]:
    """The nodes that never answered SSH.

    On AWS a fresh Ubuntu takes minutes to boot: try until BOOT_TIMEOUT, and make each node's
    answer the command that schedules its lifetime cap, so the cap holds from `up` on, even for
    a cluster whose setup never runs. Elsewhere CONNECTION_TRIES tries, 5 s apart.
    """
    if settings.provider != "aws":
        alive = handles.node_manager.is_alive(ids, retries=settings.connection_tries, wait_timeout=5)
        return [node_id for node_id in ids if not alive.get(node_id)]
    say(f"waiting up to BOOT_TIMEOUT={settings.boot_timeout} s for the nodes to answer SSH (a fresh node boots "
        f"for minutes); each answer schedules its shutdown MAX_HOURS={settings.max_hours:g} h after `up`")
    deadline = time.monotonic() + settings.boot_timeout
    waiting = list(ids)
    while True:
        answer = lifetime_command(lifetime_minutes(settings, state))
        alive = handles.node_manager.is_alive(waiting, retries=1, test_command=answer)
        waiting = [node_id for node_id in waiting if not alive.get(node_id)]
        if not waiting or time.monotonic() + AWS_SSH_EVERY_S > deadline:
            return waiting
        time.sleep(AWS_SSH_EVERY_S)


def terminate_nodes(settings: Settings, handles: Clap, state: dict, ids: list[str]) -> None:
    """Terminate these nodes now and drop them from nodes.json and CLAP's records."""
    import aws

    cloud_ids = [node["cloud_id"] for node in state["nodes"] if node["id"] in ids]
    with aws_errors("they stay in nodes.json: `make down` terminates them"):
        aws.terminate_and_wait(aws_client(settings), cloud_ids, timeout=600)
    for node_id in ids:
        handles.node_manager.remove_node(node_id)
    state["nodes"] = [node for node in state["nodes"] if node["id"] not in ids]
    for rank, node in enumerate(state["nodes"]):
        node["rank"] = rank
    write_state(settings, state)


def hourly_cost(settings: Settings, count: int) -> float | None:
    import aws

    template, provider, _ = aws_template(settings)
    try:
        return aws.hourly_cost(template["flavor"], provider["region"], count)
    except aws.AwsError as error:
        warn(str(error))
        return None


def sweep_instances(settings: Settings, state: dict | None) -> list[str]:
    """Terminate every instance tagged with this cluster (or project, when the cluster is unknown)
    and wait until each is really terminated. Returns the ids that were still alive."""
    import aws

    client = aws_client(settings)
    cluster_id = state["cluster_id"] if state else None
    with aws_errors("run `make down` again, or terminate them in the EC2 console"):
        alive = [i["InstanceId"] for i in aws.find_cluster_instances(client, PROJECT, cluster_id)]
        untagged = [i["InstanceId"] for i in untagged_launches(settings, state, client)]
        if untagged:
            warn(f"terminating {len(untagged)} instances of key pair {settings.keypair_name} that `up` started "
                 f"but never tagged: {', '.join(untagged)}")
        try:
            aws.terminate_and_wait(client, alive + untagged, timeout=600)
        except TimeoutError as error:
            raise UserError(f"{error}: run `make down` again, or terminate them in the EC2 console.") from None
    return alive + untagged


def untagged_launches(settings: Settings, state: dict | None, client: Any) -> list[dict]:
    """Instances this cluster's `up` started that carry none of our tags (its start was cut short)."""
    import aws

    if not state or not settings.keypair_name:
        return []  # without the cluster's start time, nothing tells them from the user's other instances
    configs = settings.clap_path / "configs"
    template = read_yaml(configs / "instances.yaml").get(state.get("instance_type", settings.instance_type), {})
    if not template:
        return []
    launch = aws.Launch(settings.keypair_name, str(template["image_id"]), str(template["flavor"]), state["created"])
    return aws.find_untagged_launches(client, launch)
