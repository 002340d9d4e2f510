"""make up: start NODES nodes through CLAP and record them, in rank order, in nodes.json.

Idempotent: when nodes.json already lists live nodes, nothing is started.
"""

from __future__ import annotations

import argparse
import secrets
import time

import common
from common import UserError


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    settings = common.load_settings()
    with common.exclusive(settings, "up"):
        state = common.read_state(settings)
        if state and state.get("nodes"):
            return already_up(settings, state)
        common.preflight(settings)
        if settings.dry_run:
            return show_plan(settings)
        if settings.provider == "local" and not settings.ssh_hosts:
            common.ensure_local_key(settings)

        state = {"format": common.STATE_FORMAT, "cluster_id": f"c-{secrets.token_hex(4)}",
                 "provider": settings.provider, "instance_type": settings.instance_type,
                 "created": time.time(), "nodes": [], "steps": {}, "runs": []}
        handles = common.clap(settings, state)
        template = common.instance_info(settings, handles.config_db)
        common.say(f"starting {settings.nodes} {settings.instance_type} nodes (cluster {state['cluster_id']})")
        if settings.provider == "aws":
            cost = common.hourly_cost(settings, settings.nodes)
            if cost is not None:
                common.say(f"expected cost: ${cost:.4f} per hour; they terminate themselves after "
                           f"MAX_HOURS={settings.max_hours:g} h")
        common.write_state(settings, state)  # the cluster id, before anything starts
        with common.recording(settings, state, "up"):
            ids = handles.node_manager.start_node(template, count=settings.nodes)
            nodes = {node.node_id: node for node in handles.node_manager.get_nodes_by_id(ids)}
            state["nodes"] = [
                {"id": node_id, "rank": rank, "name": nodes[node_id].nickname, "address": nodes[node_id].ip,
                 "private_address": nodes[node_id].extra.get("private_ip") or nodes[node_id].ip,
                 "cloud_id": nodes[node_id].cloud_instance_id}
                for rank, node_id in enumerate(ids)
            ]
            common.write_state(settings, state)  # recorded before anything else can fail
            handles.node_manager.add_tags(ids, common.cluster_tags(state))
            if settings.provider == "aws":
                common.adopt_instances(settings, state, [node["cloud_id"] for node in state["nodes"]])
            if settings.connection_tries > 0:
                alive = handles.node_manager.is_alive(ids, retries=settings.connection_tries, wait_timeout=5)
                dead = [node_id[:8] for node_id, ok in alive.items() if not ok]
                if dead:
                    raise UserError(f"nodes {', '.join(dead)} do not answer SSH after {settings.connection_tries} "
                                    f"tries: they are recorded; `make down` stops them.")
    for node in state["nodes"]:
        common.say(f"rank {node['rank']}: node {node['id'][:8]} at {node['address']}")
    common.say(f"{settings.nodes} nodes up in {state['steps']['up']['seconds']:.1f} s; next: make setup")
    return 0


def show_plan(settings: common.Settings) -> int:
    cost = common.hourly_cost(settings, settings.nodes) if settings.provider == "aws" else 0.0
    print(f"DRY RUN: would start {settings.nodes} {settings.instance_type} nodes on {settings.provider}"
          f"{f', expected cost ${cost:.4f} per hour' if cost else ''}, then check SSH "
          f"{settings.connection_tries} times. Nothing was started or written.")
    return 0


def already_up(settings: common.Settings, state: dict) -> int:
    handles = common.clap(settings, state)
    alive = common.nodes_alive(handles, common.node_ids(state))
    if all(alive.values()):
        common.say(f"already up: {len(alive)} nodes of cluster {state['cluster_id']}, nothing to do.")
        return 0
    dead = ", ".join(node_id[:8] for node_id, ok in alive.items() if not ok)
    raise UserError(f"{settings.nodes_file.name} lists nodes that are gone ({dead}): run `make down`, "
                    f"then `make up`.")


if __name__ == "__main__":
    common.main_guard(main)
