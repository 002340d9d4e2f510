"""make down: stop every node of the cluster and clear nodes.json once CLAP confirms.

Idempotent. It also finds nodes that nodes.json lost (a damaged file, a Ctrl-C
at the wrong time) through CLAP's records and the local provider's own records.
"""

from __future__ import annotations

import argparse
import subprocess

import aws_nodes
import cluster
import cluster_state
import config
import output
from output import UserError


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    settings = config.load_settings()
    with cluster_state.exclusive(settings, "down"):
        try:
            state = cluster_state.read_state(settings)
        except UserError as error:
            output.warn(f"{error} Stopping every node CLAP knows for this project instead.")
            state = None
        cluster_state.check_provider(settings, state)
        handles = cluster.clap(settings, state)
        ids = cluster_state.node_ids(state) if state else []
        ids += [n for n in cluster.project_nodes(handles, state) if n not in ids]
        known = cloud_ids(handles, ids)
        addresses = {node["address"] for node in (state or {}).get("nodes", [])}
        addresses |= {node.ip for node in handles.node_manager.get_nodes_by_id(ids) if node.ip}
        if settings.dry_run:
            print(plan(settings, ids))
            return 0
        if ids:
            output.say(f"stopping {len(ids)} nodes")
            with cluster.clap_quietly(settings, "down", "stop the nodes",
                                      "they stay recorded: run `make down` again") as log:
                stopped = set(handles.node_manager.stop_nodes(ids))
            left = [cluster_state.short_id(node_id) for node_id in ids if node_id not in stopped]
            if left and settings.provider != "aws":
                raise UserError(f"nodes {', '.join(left)} did not stop (see {log or 'above'}); they stay in "
                                f"{settings.nodes_file.name}: run `make down` again.")
        if settings.provider == "aws":
            # By tag: CLAP keeps no record of an instance its start lost, nor stops one already stopping.
            orphans = len(set(aws_nodes.sweep_instances(settings, state)) - known)
            for node in handles.node_manager.get_all_nodes():
                if node.node_id in ids:  # terminated for sure now, whatever CLAP's stop said
                    handles.node_manager.remove_node(node.node_id)
            forget_host_keys(settings, addresses)
        else:
            orphans = cluster.stop_local_orphans(settings, handles)
        cluster.close_connections(settings)
        for run in (state or {}).get("runs", []):
            if not run.get("fetched") and settings.provider == "local":
                output.warn(f"run {run['id']} was never fetched; it stays in {settings.user_dir}/runs/{run['id']}")
        cluster_state.write_state(settings, None)
    if not ids and not orphans:
        output.say("nothing running: already down.")
    else:
        output.say(f"down: {len(ids) + orphans} nodes stopped, {settings.nodes_file.name} cleared.")
    return 0


def plan(settings: config.Settings, ids: list[str]) -> str:
    sweep = (f"this checkout's instances tagged {cluster_state.PROJECT}" if settings.provider == "aws"
             else "unrecorded local hosts")
    return (f"DRY RUN: would stop {len(ids)} nodes ({', '.join(cluster_state.short_id(i) for i in ids) or 'none'}), "
            f"sweep {sweep} and clear {settings.nodes_file.name}. Nothing was stopped or written.")


def forget_host_keys(settings: config.Settings, addresses: set[str]) -> None:
    """EC2 hands a released public address to the next instance, whose new key `accept-new` would refuse."""
    known_hosts = cluster.known_hosts_file(settings)
    if not known_hosts.exists():
        return
    for address in sorted(addresses):
        subprocess.run(["ssh-keygen", "-R", address, "-f", str(known_hosts)], capture_output=True, check=False)
    known_hosts.with_name(known_hosts.name + ".old").unlink(missing_ok=True)  # ssh-keygen's backup


def cloud_ids(handles: cluster.Clap, ids: list[str]) -> set[str]:
    return {node.cloud_instance_id for node in handles.node_manager.get_nodes_by_id(ids)}


if __name__ == "__main__":
    output.main_guard(main)
