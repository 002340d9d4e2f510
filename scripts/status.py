"""make status: the cluster at a glance, without running Ansible.

Provider, nodes (rank, address, alive), steps done with their times, runs.
With nodes.json lost or damaged, it lists what CLAP's records still know.
"""

from __future__ import annotations

import argparse
import sys
import time

import aws_nodes
import cluster
import cluster_state
import config
import dcgan_logs
import output
import run_logs
from output import UserError


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    settings = config.load_settings()
    try:
        state = cluster_state.read_state(settings)
    except UserError as error:
        output.warn(str(error))
        state = None
    if state is None or not state.get("nodes"):
        return report_records(settings, state)

    handles = cluster.clap(settings, state)
    alive = cluster.nodes_alive(handles, cluster_state.node_ids(state))
    age = time.time() - state["created"]
    print(f"cluster {state['cluster_id']}  provider {state['provider']}  {state['instance_type']}  "
          f"up {age / 60:.0f} min")
    for node in state["nodes"]:
        print(f"  rank {node['rank']}  {cluster_state.short_id(node['id'])}  {node['address']:15}  "
              f"{'alive' if alive[node['id']] else 'GONE'}")
    if state.get("sweep"):
        sweep = state["sweep"]
        print(f"  sweep: point {sweep['point']} of {sweep['of']} ({sweep['size']} {sweep['type']} nodes)")
    for step, record in state.get("steps", {}).items():
        took = f"{record['seconds']:.1f} s" if "seconds" in record else "since " + _clock(record["started"])
        print(f"  {step:8} {record['state']:8} {took}")
    for run in state.get("runs", []):
        fetched = f"fetched to {run['fetched']}" if run.get("fetched") else "not fetched"
        print(f"  {run['id']}  {run['state']:8} {run['epochs']} epochs  {fetched}")
        if run.get("reason"):
            print(f"      why: {run['reason']}")
    if state.get("runs") and state["runs"][-1]["state"] == "running" and all(alive.values()):
        logs = run_logs.read_run_logs(settings, state, state["runs"][-1]["id"], handles)
        for rank, text in sorted(logs.items()):
            log = dcgan_logs.parse_log(text)
            log.rank = rank if log.rank is None else log.rank
            print("    " + dcgan_logs.progress_line(log, None, None, color=sys.stdout.isatty()))
    if settings.provider == "aws":
        cost = aws_nodes.hourly_cost(settings, len(state["nodes"]))
        if cost is not None:
            print(f"  cost so far about ${cost * age / 3600:.2f} (${cost:.4f}/hour)")
        cloud_report(settings, state, {node.get("cloud_id") for node in state["nodes"]})
    return 0 if all(alive.values()) else 1


def cloud_report(settings: config.Settings, state: dict | None, known: set[str]) -> bool:
    """Print the project's live instances that nodes.json does not list, found by tag: this checkout's
    (`make down` stops them) and other checkouts' (a shared account: listed, never touched). Returns
    whether this checkout has any."""
    import aws
    from aws_launch import owner_id

    owner = owner_id(settings)
    with aws.aws_errors():
        found = aws.find_cluster_instances(aws_nodes.aws_client(settings), cluster_state.PROJECT)
    ours = [i for i in found if owner and aws.tags_of(i).get(aws.TAG_OWNER) == owner and i["InstanceId"] not in known]
    others = [i for i in found if owner is None or aws.tags_of(i).get(aws.TAG_OWNER) != owner]
    cluster_id = state["cluster_id"] if state else None
    now = [i for i in ours if cluster_id in (None, aws.tags_of(i).get(aws.TAG_CLUSTER))]
    later = [i for i in ours if i not in now]
    if now:
        print(f"  RUNNING, not in {settings.nodes_file.name}: {_names(now)}: `make down` stops them")
    if later:
        print(f"  RUNNING, of this checkout's other clusters: {_names(later)}: `make down` stops this cluster's, "
              f"then a second `make down` these")
    if others:
        print(f"  other checkouts' instances of this project (not touched): {_names(others)}")
    return bool(ours)


def _names(instances: list[dict]) -> str:
    import aws

    return ", ".join(f"{i['InstanceId']} (cluster {aws.tags_of(i).get(aws.TAG_CLUSTER, '?')})"
                     for i in sorted(instances, key=lambda i: i["InstanceId"]))


def report_records(settings: config.Settings, state: dict | None) -> int:
    """No usable nodes.json: is anything of ours still running?"""
    handles = cluster.clap(settings, state)
    ids = cluster.project_nodes(handles, None)
    if settings.provider == "aws" and cloud_report(settings, state, set()):
        return 1
    if not ids:
        print(f"no cluster: nothing in {settings.nodes_file.name} and no node of this project in CLAP's records.")
        return 0
    alive = cluster.nodes_alive(handles, ids)
    print(f"{settings.nodes_file.name} lists no nodes, but CLAP's records hold {len(ids)} of this project:")
    for node in handles.node_manager.get_nodes_by_id(ids):
        print(f"  {cluster_state.short_id(node.node_id)}  {node.ip or '-':15}  "
              f"{'alive' if alive[node.node_id] else 'gone'}  cluster {node.tags.get('cluster', '?')}")
    print("`make down` stops them.")
    return 1


def _clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


if __name__ == "__main__":
    output.main_guard(main)
