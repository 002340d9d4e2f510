"""make up: start NODES nodes through CLAP and record them, in rank order, in nodes.json.

Idempotent: when nodes.json already lists NODES or more live nodes, nothing is started.
With fewer, the cluster grows: the difference is started and appended in rank order.
"""

from __future__ import annotations

import argparse
import secrets
import time

import aws_nodes
import checks
import cluster
import cluster_state
import config
import output
from output import UserError


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    settings = config.load_settings()
    with cluster_state.exclusive(settings, "up"):
        state = cluster_state.read_state(settings)
        if state and state.get("nodes"):
            already_up(settings, state)
            if settings.nodes <= len(state["nodes"]):
                return 0
        checks.preflight(settings)
        first = len(state["nodes"]) if state and state.get("nodes") else 0
        count = settings.nodes - first
        if settings.dry_run:
            return show_plan(settings, count)
        if settings.provider == "local" and not settings.ssh_hosts:
            cluster.ensure_local_key(settings)

        if not first:
            state = {"format": cluster_state.STATE_FORMAT, "cluster_id": f"c-{secrets.token_hex(4)}",
                     "provider": settings.provider, "instance_type": settings.instance_type,
                     "created": time.time(), "nodes": [], "steps": {}, "runs": []}
        state["steps"].pop("setup", None)  # the new nodes are not set up yet
        handles = cluster.clap(settings, state)
        template = cluster.instance_info(settings, handles.config_db)
        output.say(f"starting {count} {settings.instance_type} nodes (cluster {state['cluster_id']})")
        if settings.provider == "aws":
            cost = aws_nodes.hourly_cost(settings, settings.nodes)
            if cost is not None:
                output.say(f"expected cost: ${cost:.4f} per hour ({settings.market}); they terminate themselves "
                           f"after MAX_HOURS={settings.max_hours:g} h")
        cluster_state.write_state(settings, state)  # the cluster id, before anything starts
        with cluster_state.recording(settings, state, "up"):
            with cluster.clap_quietly(settings, "up", "start the nodes",
                                      "`make down` stops any node that started"):
                ids = handles.node_manager.start_node(template, count=count)
                nodes = {node.node_id: node for node in handles.node_manager.get_nodes_by_id(ids)}
                state["nodes"] += [
                    {"id": node_id, "rank": rank, "name": nodes[node_id].nickname, "address": nodes[node_id].ip,
                     "private_address": nodes[node_id].extra.get("private_ip") or nodes[node_id].ip,
                     "cloud_id": nodes[node_id].cloud_instance_id}
                    for rank, node_id in enumerate(ids, start=first)
                ]
                efs = nodes[ids[0]].extra.get("efs") if ids else None
                if efs:  # the shared filesystem the provider made for these nodes, for the role's setup
                    state["efs"] = efs
                cluster_state.write_state(settings, state)  # recorded before anything else can fail
                handles.node_manager.add_tags(ids, cluster_state.cluster_tags(state))
            if settings.connection_tries > 0:
                dead = aws_nodes.wait_for_ssh(settings, handles, state, ids)
                names = ", ".join(map(cluster_state.short_id, dead))
                if dead and settings.provider == "aws":
                    # a node that never answers is only a bill
                    aws_nodes.terminate_nodes(settings, handles, state, dead)
                    left = len(state["nodes"])
                    raise UserError(f"nodes {names} did not answer SSH within BOOT_TIMEOUT={settings.boot_timeout} s "
                                    f"and were terminated; " + (f"the other {left} are recorded: `make down` stops "
                                    f"them, then `make up` again." if left else "run `make up` again."))
                if dead:
                    raise UserError(f"nodes {names} do not answer SSH after {settings.connection_tries} "
                                    f"tries: they are recorded; `make down` stops them.")
    for node in state["nodes"]:
        output.say(f"rank {node['rank']}: node {cluster_state.short_id(node['id'])} at {node['address']}")
    output.say(f"{settings.nodes} nodes up in {state['steps']['up']['seconds']:.1f} s; next: make setup")
    return 0


def show_plan(settings: config.Settings, count: int) -> int:
    cost = aws_nodes.hourly_cost(settings, settings.nodes) if settings.provider == "aws" else 0.0
    ssh_plan = (f"for up to BOOT_TIMEOUT={settings.boot_timeout} s, terminating a node that never answers."
                if settings.provider == "aws" and settings.connection_tries else f"{settings.connection_tries} times.")
    print(f"DRY RUN: would start {count} {settings.instance_type} nodes on {settings.provider}"
          f"{f', expected cost ${cost:.4f} per hour' if cost else ''}, then check SSH "
          f"{ssh_plan} Nothing was started or written.")
    return 0


def already_up(settings: config.Settings, state: dict) -> None:
    """The recorded nodes are all alive (and, to grow them, of INSTANCE_TYPE), or a sentence says what to do."""
    handles = cluster.clap(settings, state)
    alive = cluster.nodes_alive(handles, cluster_state.node_ids(state))
    if all(alive.values()) and len(alive) >= settings.nodes:
        output.say(f"already up: {len(alive)} nodes of cluster {state['cluster_id']}, nothing to do.")
        return
    if all(alive.values()):
        cluster_state.check_provider(settings, state)
        if state["instance_type"] != settings.instance_type:
            raise UserError(f"the cluster's nodes are {state['instance_type']}, not INSTANCE_TYPE="
                            f"{settings.instance_type}: set INSTANCE_TYPE={state['instance_type']} to add "
                            f"nodes, or `make down` first.")
        output.say(f"growing cluster {state['cluster_id']} from {len(alive)} to {settings.nodes} nodes")
        return
    dead = ", ".join(cluster_state.short_id(node_id) for node_id, ok in alive.items() if not ok)
    raise UserError(f"{settings.nodes_file.name} lists nodes that are gone ({dead}): run `make down`, "
                    f"then `make up`.")


if __name__ == "__main__":
    output.main_guard(main)
