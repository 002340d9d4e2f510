"""The dcgan role on two real namespace hosts, played as CLAP plays it (no CLAP needed).

The inventory has CLAP's shape: host name = node id, group `dcgan`, ansible_host,
per-node node_rank and private_ip; the role's vars come as extra vars.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import failure_messages, play, role_cluster

# One worker plays them all, in order: each builds on the module's hosts as the last left them.
pytestmark = pytest.mark.xdist_group("role_hosts")


@pytest.fixture(scope="module")
def cluster(hosts: list, ssh_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    with role_cluster(hosts, ssh_key, tmp_path_factory.mktemp("role")) as made:
        yield made


def test_setup_succeeds_then_changes_nothing(cluster: dict) -> None:
    first = play(cluster, "setup")
    assert first.status == "successful", failure_messages(first)
    second = play(cluster, "setup")
    assert second.status == "successful"
    assert sum(second.stats["changed"].values()) == 0, second.stats["changed"]


def test_setup_says_where_the_app_is_missing(cluster: dict, tmp_path: Path) -> None:
    result = play(cluster, "setup", dcgan_dir=str(tmp_path))
    assert result.status == "failed"
    message = failure_messages(result)
    assert f"{tmp_path}/dist_dcgan.py not found" in message and "set DCGAN_DIR" in message


def test_setup_says_where_the_data_is_missing(cluster: dict, tmp_path: Path) -> None:
    result = play(cluster, "setup", cifar_data_dir=str(tmp_path))
    assert result.status == "failed"
    assert "cifar-10-batches-py/test_batch not found" in failure_messages(result)


def test_setup_says_when_the_python_lacks_torch(cluster: dict) -> None:
    result = play(cluster, "setup", dcgan_python="/usr/bin/python3")
    assert result.status == "failed"
    assert "/usr/bin/python3 has no torch" in failure_messages(result)


@pytest.fixture(scope="module")
def trained(cluster: dict) -> Path:
    """Run r1 (2 epochs) on the module's hosts, once for the tests that need a run: its folder."""
    result = play(cluster, "run", run_id="r1", epochs=2, master_hostname=cluster["ids"][0])
    assert result.status == "successful", failure_messages(result)
    return cluster["user_dir"] / "runs" / "r1"


def test_run_trains_one_rank_per_node(cluster: dict, trained: Path) -> None:
    run_dir = trained
    for rank, node_id in enumerate(cluster["ids"]):
        log = (run_dir / f"output-{rank}.txt").read_text()
        assert f"Rank: {rank}. World Size: 2" in log
        assert f"[rank: {rank}] Epoch 1 took:" in log  # the last of 2 epochs
        assert json.loads((run_dir / f".rank-{rank}.json").read_text())["node"] == node_id
        assert json.loads((run_dir / f".rank-{rank}.exit").read_text())["code"] == 0
    assert list(run_dir.glob("fake_samples_rank_0_epoch_1_iter_0.png"))


def test_results_land_once_and_are_never_overwritten(cluster: dict, trained: Path, tmp_path: Path) -> None:
    results = tmp_path / "results"
    first = play(cluster, "results", results_dir=str(results), run_id="r1")
    assert first.status == "successful", failure_messages(first)
    landed = results / "r1"
    assert {"output-0.txt", "output-1.txt"} <= {p.name for p in landed.iterdir()}
    assert list(landed.glob("fake_samples_*.png"))
    before = {p.name: p.stat().st_mtime_ns for p in landed.iterdir()}

    again = play(cluster, "results", results_dir=str(results), run_id="r1")
    assert again.status == "failed"
    assert "already exists" in failure_messages(again)
    assert {p.name: p.stat().st_mtime_ns for p in landed.iterdir()} == before

    second_run = play(cluster, "run", run_id="r2", epochs=1, master_hostname=cluster["ids"][0])
    assert second_run.status == "successful", failure_messages(second_run)
    assert play(cluster, "results", results_dir=str(results), run_id="r2").status == "successful"
    assert "[rank: 1] Epoch 0 took:" in (results / "r2" / "output-1.txt").read_text()
    assert sorted(p.name for p in results.iterdir()) == ["r1", "r2"]


def test_results_of_a_run_that_never_started(cluster: dict, tmp_path: Path) -> None:
    result = play(cluster, "results", results_dir=str(tmp_path), run_id="nope")
    assert result.status == "failed"
    assert "run nope never started there" in failure_messages(result)
    assert list(tmp_path.iterdir()) == []


def test_hosts_take_keys_only_and_listen_only_on_their_address(cluster: dict) -> None:
    host = cluster["hosts"][0]
    password = subprocess.run(
        ["ssh", "-o", "BatchMode=yes", "-o", "PreferredAuthentications=password,keyboard-interactive",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", f"root@{host.address}", "true"],
        capture_output=True, text=True, timeout=30)
    assert password.returncode == 255 and "Permission denied" in password.stderr
    listening = subprocess.run(["ip", "netns", "exec", host.namespace, "ss", "-Hltn"],
                               capture_output=True, text=True, check=True).stdout.split()
    assert f"{host.address}:22" in listening and "0.0.0.0:22" not in listening and "*:22" not in listening


def test_commands_on_a_host_skip_this_machines_shell_setup(cluster: dict, ssh_key: Path) -> None:
    """The hosts share this machine's home folders; a fresh node has no ~/.bashrc of the operator's
    (pyenv's, say: a sixth of a second on every SSH session of every step), so its sessions do not read it."""
    session = subprocess.run(
        ["ssh", "-i", str(ssh_key), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
         "-o", "UserKnownHostsFile=/dev/null", f"root@{cluster['hosts'][0].address}", 'echo "$PATH"'],
        capture_output=True, text=True, timeout=30, check=True)
    assert session.stdout.strip() == "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
