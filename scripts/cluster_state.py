"""nodes.json, the record of the cluster: read and replaced atomically, one step at a time (a lock
beside it), each step recorded with its times; and the tags that tell this cluster's nodes."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from config import Settings
from output import UserError

STATE_FORMAT = 1  # nodes.json's format: read_state refuses another
PROJECT = "dcgan-clap"  # the tag of every node this project makes


def read_state(settings: Settings) -> dict | None:
    path = settings.nodes_file
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise UserError(f"{path} is damaged (not JSON): `make status` and `make down` still find the nodes "
                        f"through CLAP's records; after `make down`, delete {path.name}.") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path} has format {state.get('format') if isinstance(state, dict) else '?'}, "
                        f"this version reads format {STATE_FORMAT}: stop its nodes with the version that "
                        f"made it (or `make down`, which also finds them through CLAP), then delete it.")
    return state


def write_state(settings: Settings, state: dict | None) -> None:
    """Replace nodes.json atomically."""
    if state is None:
        settings.nodes_file.unlink(missing_ok=True)
        return
    write_json(settings.nodes_file, state)


def write_json(path: Path, data: dict) -> None:
    """Replace a JSON file atomically (a crash leaves the old or the new file, never half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as out:
        json.dump(data, out, indent=2)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def exclusive(settings: Settings, step: str) -> AbstractContextManager[None]:
    """One step at a time on a nodes.json: a second command refuses, naming the first."""
    return exclusive_file(settings.nodes_file, step)


@contextmanager
def exclusive_file(path: Path, step: str) -> Iterator[None]:
    """One command at a time on the state file path (a lock beside it): a second refuses, naming the first."""
    lock_path = path.with_name(f".{path.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another command"
            raise UserError(f"{holder} is using {path.name}: wait for it to end "
                            f"(or stop it), then run `make {step}` again.") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"`make {step}` (PID {os.getpid()})")
        lock.flush()
        try:
            yield
        finally:
            lock.truncate(0)


def need_nodes(settings: Settings, step: str) -> dict:
    state = read_state(settings)
    if not state or not state.get("nodes"):
        raise UserError(f"no nodes in {settings.nodes_file.name}: run `make up` before `make {step}`.")
    check_provider(settings, state)
    return state


def check_provider(settings: Settings, state: dict | None) -> None:
    if state and state.get("provider") != settings.provider:
        raise UserError(f"{settings.nodes_file.name} holds a PROVIDER={state.get('provider')} cluster but "
                        f"PROVIDER={settings.provider}: set PROVIDER={state.get('provider')} (in .env or on "
                        f"the command line) to work on it.")


@contextmanager
def recording(settings: Settings, state: dict, step: str) -> Iterator[dict]:
    """Record a step as running, then done or failed, with its times, in nodes.json."""
    started = time.time()
    state.setdefault("steps", {})[step] = {"state": "running", "started": started}
    write_state(settings, state)
    outcome = "failed"
    try:
        yield state
        outcome = "done"
    finally:
        finished = time.time()
        state["steps"][step] = {"state": outcome, "started": started, "finished": finished,
                                "seconds": round(finished - started, 2)}
        write_state(settings, state)


def node_ids(state: dict) -> list[str]:
    return [node["id"] for node in state["nodes"]]


def short_id(node_id: str) -> str:
    """A node id as the messages show it; a DRY_RUN placeholder whole."""
    return node_id if node_id.startswith("<") else node_id[:8]


def cluster_tags(state: dict | None) -> dict[str, str]:
    return {"project": PROJECT, "cluster": state["cluster_id"]} if state else {"project": PROJECT}
