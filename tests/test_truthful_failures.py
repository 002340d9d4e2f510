"""`make all` says the nodes are kept only when they are: nodes.json lists nodes and CLAP finds them alive."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cluster_state
from conftest import ROOT, clap_checkout


def test_all_with_nodes_that_are_gone_names_the_fix_only(project: dict) -> None:
    gone = {"id": "f" * 32, "rank": 0, "name": "n0", "address": "10.0.0.2", "private_address": "10.0.0.2",
            "cloud_id": "dcgan-gone"}
    Path(project["NODES_FILE"]).write_text(json.dumps(
        {"format": cluster_state.STATE_FORMAT, "cluster_id": "c-gone", "provider": "local",
         "instance_type": "type-local", "created": time.time(), "steps": {}, "runs": [], "nodes": [gone]}))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "all.py")],
                          env={**project, "CLAP": str(clap_checkout())}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "lists nodes that are gone" in done.stderr and "make down" in done.stderr, done.stderr
    assert "KEPT" not in done.stderr
