"""The nodes on EC2 as the steps see them: the wait for them to answer SSH, their termination,
their bill and the sweep of this checkout's instances of the cluster. What they are launched with
(tags, lifetime cap) is aws_launch's; the provider that starts them, aws_provider's.

aws.py (boto3) is imported inside the functions that call EC2: a local step does not pay the
0.6 s its import takes.
"""

from __future__ import annotations

import time
from typing import Any

from clap_configs import aws_template
from cluster import Clap
from cluster_state import PROJECT, write_state
from config import Settings
from output import UserError, say, warn

AWS_SSH_EVERY_S = 10  # seconds between two SSH attempts on a booting EC2 node


def aws_client(settings: Settings) -> Any:
    import aws

    with aws.aws_errors():
        return aws.ec2_client_from_clap_config(settings.clap_path, aws_template(settings)[0]["provider"])


def lifetime_minutes(settings: Settings, state: dict) -> int:
    """Minutes until MAX_HOURS after `up` began (at least 1): when each node shuts itself down."""
    return max(1, int(settings.max_hours * 60 - (time.time() - state["created"]) / 60))


def wait_for_ssh(settings: Settings, handles: Clap, state: dict, ids: list[str]) -> list[str]:
    """The nodes that never answered SSH: on AWS tried until BOOT_TIMEOUT (a fresh Ubuntu boots
    for minutes), elsewhere CONNECTION_TRIES times, 5 s apart. The lifetime cap does not wait
    for SSH: each EC2 node schedules its own shutdown at first boot (aws_launch.user_data)."""
    try:
        if settings.provider != "aws":
            alive = handles.node_manager.is_alive(ids, retries=settings.connection_tries, wait_timeout=5)
            return [node_id for node_id in ids if not alive.get(node_id)]
        say(f"waiting up to BOOT_TIMEOUT={settings.boot_timeout} s for the nodes to answer SSH (a fresh node "
            f"boots for minutes)")
        deadline = time.monotonic() + settings.boot_timeout
        waiting = list(ids)
        while True:
            alive = handles.node_manager.is_alive(waiting, retries=1)
            waiting = [node_id for node_id in waiting if not alive.get(node_id)]
            if not waiting or time.monotonic() + AWS_SSH_EVERY_S > deadline:
                return waiting
            time.sleep(AWS_SSH_EVERY_S)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as error:  # CLAP's SSH check raises what paramiko does
        raise UserError(f"CLAP failed while waiting for the nodes to answer SSH ({error or type(error).__name__}): "
                        f"they are recorded; `make down` stops them.") from error


def terminate_nodes(settings: Settings, handles: Clap, state: dict, ids: list[str]) -> None:
    """Terminate these nodes now and drop them from nodes.json and CLAP's records."""
    import aws

    cloud_ids = [node["cloud_id"] for node in state["nodes"] if node["id"] in ids]
    with aws.aws_errors("they stay in nodes.json: `make down` terminates them"):
        aws.terminate_and_wait(aws_client(settings), cloud_ids, timeout=600)
    for node_id in ids:
        handles.node_manager.remove_node(node_id)
    state["nodes"] = [node for node in state["nodes"] if node["id"] not in ids]
    for rank, node in enumerate(state["nodes"]):
        node["rank"] = rank
    write_state(settings, state)


def hourly_cost(settings: Settings, count: int) -> float | None:
    """USD per hour of `count` nodes of INSTANCE_TYPE: at the current spot price with MARKET=spot
    (when EC2 gives one), else the on-demand price of clap_config/prices.yaml."""
    import aws

    template, provider, _ = aws_template(settings)
    if settings.market == "spot":
        with aws.aws_errors():
            price = aws.spot_price(aws_client(settings), template["flavor"])
        if price is not None:
            return round(price * count, 6)
        warn(f"EC2 gives no spot price for {template['flavor']} in {provider['region']}: the on-demand price is shown")
    try:
        return aws.hourly_cost(template["flavor"], provider["region"], count)
    except aws.AwsError as error:
        warn(str(error))
        return None


def sweep_instances(settings: Settings, state: dict | None) -> list[str]:
    """Terminate every instance of this checkout tagged with this cluster (with every cluster of this
    checkout's when the cluster is unknown) and wait until each is really terminated. Other checkouts'
    instances are never touched. Returns the ids that were still alive."""
    import aws
    from aws_launch import owner_id

    owner = owner_id(settings)
    if owner is None:
        return []  # this checkout never started an instance
    client = aws_client(settings)
    cluster_id = state["cluster_id"] if state else None
    with aws.aws_errors("run `make down` again, or terminate them in the EC2 console"):
        alive = [i["InstanceId"] for i in aws.find_cluster_instances(client, PROJECT, owner, cluster_id)]
        aws.terminate_and_wait(client, alive, timeout=600)
    return alive
