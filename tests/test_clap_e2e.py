"""`make` targets end to end through real CLAP on the local provider (root + CLAP).

`make test` finds CLAP (yours, the submodule, or the pinned archive in ../shared/clap);
without any, these skip with the reason, and fail under CI.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import cluster
import config
from conftest import ROOT, clap_checkout, leftovers, need_root, subnet, subnet_tag
from local_hosts import LocalHosts


@pytest.fixture
def env(project: dict) -> dict:
    need_root()
    project["CLAP"] = str(clap_checkout())
    yield project
    # Whatever a test left, pass or fail: stop it the way a user would, then check.
    make(project, "down")
    assert leftovers(subnet_tag(251)) == []


def make(env: dict, *targets: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "-C", str(ROOT), *targets], env={**env, **extra}, capture_output=True,
                          text=True, timeout=900)


def assert_trained(run_dir: Path, epochs: int) -> None:
    for rank in (0, 1):
        log = (run_dir / f"output-{rank}.txt").read_text()
        assert f"[rank: {rank}] Epoch {epochs - 1} took:" in log
    assert list(run_dir.glob("fake_samples_rank_0_*.png"))


def test_make_all_trains_fetches_and_leaves_nothing(env: dict) -> None:
    done = make(env, "all")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = list(Path(env["RESULTS_DIR"]).iterdir())
    assert len(runs) == 1
    assert_trained(runs[0], epochs=2)
    assert (runs[0] / "report.png").is_file() and f"report: wrote {runs[0]}/summary.json" in done.stdout
    assert not Path(env["NODES_FILE"]).exists()
    assert not cluster.control_dir(config.load_settings(env)).exists()  # no SSH socket folder left in /tmp
    assert leftovers(subnet_tag(251)) == []
    assert json.loads((Path(env["CLAP_PATH"]) / "storage" / "local" / "hosts.json").read_text()) == []


def test_single_targets_rerun_alone(env: dict) -> None:
    for targets in (["up"], ["up"], ["setup"], ["run", "results"], ["run", "results"]):
        done = make(env, *targets)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        if targets == ["up"]:
            state = json.loads(Path(env["NODES_FILE"]).read_text())
            setup_time = None
        elif targets == ["setup"]:
            setup_time = json.loads(Path(env["NODES_FILE"]).read_text())["steps"]["setup"]["finished"]
        else:
            assert "Make each node able to run" not in done.stdout  # run never replays setup
    assert "already up" in make(env, "up").stdout
    final = json.loads(Path(env["NODES_FILE"]).read_text())
    assert final["steps"]["setup"]["finished"] == setup_time
    assert [n["id"] for n in final["nodes"]] == [n["id"] for n in state["nodes"]]
    runs = sorted(Path(env["RESULTS_DIR"]).iterdir())
    assert [r.name for r in runs] == [r["id"] for r in final["runs"]]
    for run in runs:
        assert_trained(run, epochs=2)
    down = make(env, "down")
    assert down.returncode == 0 and "2 nodes stopped" in down.stdout
    assert "already down" in make(env, "down").stdout


def interruptible_make(targets: list[str], env: dict) -> subprocess.Popen:
    """`make` in a process group of its own with SIGINT at its default, as at a terminal, so that
    killpg(SIGINT) is a Ctrl-C even when the tests run as a background job (which ignores SIGINT)."""
    return subprocess.Popen(["make", "-s", "-C", str(ROOT), *targets], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_during_up_leaves_nothing_behind(env: dict) -> None:
    """SIGINT while CLAP is starting nodes: what was made is removed or recorded, and `make down` ends it."""
    up = interruptible_make(["up"], {**env, "NODES": "6"})
    deadline = time.monotonic() + 60
    while not leftovers(subnet_tag(251)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert leftovers(subnet_tag(251)), "no host appeared"
    os.killpg(up.pid, signal.SIGINT)
    _, err = up.communicate(timeout=60)
    assert up.returncode != 0
    assert "interrupted" in err
    make(env, "down")
    assert leftovers(subnet_tag(251)) == []
    assert "no cluster" in make(env, "status").stdout


@pytest.mark.parametrize("damage", ["deleted", "corrupted"])
def test_lost_nodes_file_still_finds_the_nodes(env: dict, damage: str) -> None:
    assert make(env, "up").returncode == 0
    nodes_file = Path(env["NODES_FILE"])
    if damage == "deleted":
        nodes_file.unlink()
    else:
        nodes_file.write_text('{"format": 1, "nod')
    status = make(env, "status")
    assert status.returncode != 0
    assert "CLAP's records hold 2 of this project" in status.stdout
    if damage == "corrupted":
        assert "is damaged (not JSON)" in status.stderr
        assert "is damaged (not JSON)" in make(env, "run").stderr  # a step refuses, clearly
    down = make(env, "down")
    assert down.returncode == 0, down.stderr
    assert "2 nodes stopped" in down.stdout
    assert leftovers(subnet_tag(251)) == []


def test_notebook_runs_the_course_flow_end_to_end(env: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    nbclient = pytest.importorskip("nbclient", reason="nbclient is not installed")
    import nbformat

    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the kernel inherits them
    notebook = nbformat.read(ROOT / "notebooks" / "dcgan.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    runs = list(Path(env["RESULTS_DIR"]).iterdir())
    assert len(runs) == 1
    assert_trained(runs[0], epochs=2)
    assert leftovers(subnet_tag(251)) == []


def test_ctrl_c_on_run_keeps_training_and_run_reattaches(env: dict) -> None:
    assert make(env, "up", "setup").returncode == 0
    run = interruptible_make(["run"], {**env, "EPOCHS": "12", "PROGRESS_EVERY": "1"})
    deadline = time.monotonic() + 120
    logs = Path(env["EFS_MOUNT_POINT"]) / "dcgan" / "runs"
    while time.monotonic() < deadline and "[iteration: 3/" not in "".join(
            p.read_text() for p in logs.glob("*/output-1.txt")):
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGINT)
    out, err = run.communicate(timeout=60)
    assert "the training goes on: `make run` re-attaches" in err
    assert "iter" in out  # progress lines were shown while it trained

    status = make(env, "status")
    assert "running" in status.stdout and "rank 1  epoch" in status.stdout  # the run's progress
    logs_now = make(env, "logs")
    assert logs_now.returncode == 0 and "--- rank 1: output-1.txt" in logs_now.stdout
    again = make(env, "run")
    assert again.returncode == 0, again.stderr
    assert "re-attaching to run" in again.stdout and "finished" in again.stdout
    state = json.loads(Path(env["NODES_FILE"]).read_text())
    assert len(state["runs"]) == 1 and state["runs"][0]["state"] == "done"
    assert "[rank: 1] Epoch 11 took:" in next(logs.glob("*/output-1.txt")).read_text()


def test_dry_run_of_all_and_down_touches_nothing(env: dict) -> None:
    dry_all = make(env, "all", "DRY_RUN=1")
    assert dry_all.returncode == 0 and "DRY RUN: would start 2 type-local nodes" in dry_all.stdout
    assert leftovers(subnet_tag(251)) == [] and not Path(env["NODES_FILE"]).exists()

    assert make(env, "up").returncode == 0
    before = Path(env["NODES_FILE"]).read_bytes()
    dry_down = make(env, "down", "DRY_RUN=1")
    assert dry_down.returncode == 0 and "DRY RUN: would stop 2 nodes" in dry_down.stdout
    assert Path(env["NODES_FILE"]).read_bytes() == before
    assert make(env, "status").stdout.count(" alive") == 2


def test_your_own_ssh_hosts_are_used_and_never_removed(env: dict, ssh_key: Path, tmp_path: Path) -> None:
    """SSH_HOSTS: machines you already have (here: namespace hosts made outside the tool)."""
    mine = LocalHosts(tmp_path / "mine", subnet(253))
    try:
        hosts = mine.create(2, ssh_key.with_suffix(".pub").read_text())
        private = Path(env["CLAP_PATH"]) / "private"
        shutil.copy(ssh_key, private / "ssh_key")
        (private / "ssh_key").chmod(0o600)
        env = {**env, "SSH_HOSTS": ",".join(h.address for h in hosts), "SSH_USER": "root", "EPOCHS": "1"}
        done = make(env, "up", "setup", "run", "logs")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "--- rank 1: output-1.txt" in done.stdout  # read over SSH on rank 0, as on a cloud
        assert_progress_reads_only_what_is_new(env)
        done = make(env, "results", "down")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (run,) = Path(env["RESULTS_DIR"]).iterdir()
        assert_trained(run, epochs=1)
        assert all(mine.is_up(h) for h in mine.hosts())  # yours: used, never removed
    finally:
        mine.destroy()
    assert leftovers(subnet_tag(253)) == []


def assert_progress_reads_only_what_is_new(env: dict) -> None:
    """The live progress over SSH: a second read brings only the bytes written since the first."""
    snippet = """
import json, cluster_state, config, run_logs
settings = config.load_settings()
state = cluster_state.read_state(settings)
logs = run_logs.RunLogs(settings, state, state["runs"][-1]["id"])
first = logs.read()
with open(f"{run_logs.run_folder(settings, state['runs'][-1]['id'])}/output-1.txt", "a") as out:
    out.write("one more line\\n")
print(json.dumps({"first": first, "new": logs._read_on_master(), "sizes": logs.sizes}))
"""
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", snippet], cwd=ROOT / "scripts", env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    read = json.loads(done.stdout.splitlines()[-1])
    assert "Epoch 0 took" in read["first"]["1"]
    assert read["new"]["1"] == [read["sizes"]["1"] + len("one more line\n"), "one more line\n"]
    assert read["new"]["0"] == [read["sizes"]["0"], ""]


def test_make_all_keeps_the_nodes_when_a_step_fails_and_says_how_to_go_on(env: dict) -> None:
    done = make(env, "all", "DCGAN_PYTHON=/usr/bin/python3")  # a Python without torch: setup fails
    assert done.returncode != 0
    assert "/usr/bin/python3 has no torch" in done.stdout + done.stderr
    assert "`make all` stopped at `setup`. The nodes are KEPT and still running." in done.stderr
    assert "resume:   make setup run results down" in done.stderr and "or stop:  make down" in done.stderr
    assert make(env, "status").stdout.count(" alive") == 2
    resumed = make(env, "setup", "run", "results", "down")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (run,) = Path(env["RESULTS_DIR"]).iterdir()
    assert_trained(run, epochs=2)


def test_the_cluster_size_comes_from_nodes_json_not_nodes(env: dict) -> None:
    """`make up NODES=6`, then setup and run with NODES unset: 6 ranks, one SSH session each at once
    (the run holds one per node: Ansible's forks must cover them all, 5 would hang the sixth)."""
    assert make(env, "up", "NODES=6").returncode == 0
    done = make(env, "setup", "run", "SYNTHETIC_IMAGES=384")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = next((Path(env["EFS_MOUNT_POINT"]) / "dcgan" / "runs").iterdir())
    for rank in range(6):
        assert "World Size: 6" in (run_dir / f"output-{rank}.txt").read_text()


def app_processes(namespace: str) -> list[int]:
    """PIDs (as this machine sees them) of the app's process on a namespace host."""
    inode = os.stat(f"/run/netns/{namespace}").st_ino
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if os.stat(proc / "ns" / "net").st_ino == inode and b"dist_dcgan.py" in (proc / "cmdline").read_bytes() \
                    and b"torch.distributed.run" not in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("hung", [1, 0])
def test_a_hung_rank_ends_the_run_within_the_stall_bound(env: dict, hung: int) -> None:
    """One rank stops progressing while its process stays alive (SIGSTOP): `make run` fails within
    STALL_TIMEOUT + 60 s naming that rank and its node; results fetch the partial outputs."""
    stall = 20
    assert make(env, "up", "setup").returncode == 0
    state = json.loads(Path(env["NODES_FILE"]).read_text())
    host = LocalHosts(Path(env["CLAP_PATH"]) / "storage" / "local", subnet(251)).hosts()
    namespace = next(h.namespace for h in host if h.address == state["nodes"][hung]["address"])
    run = subprocess.Popen(["make", "-s", "-C", str(ROOT), "run"], env={**env, "EPOCHS": "500",
                           "STALL_TIMEOUT": str(stall)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    logs = Path(env["EFS_MOUNT_POINT"]) / "dcgan" / "runs"
    while time.monotonic() < deadline and "[iteration: 3/" not in "".join(
            p.read_text() for p in logs.glob(f"*/output-{hung}.txt")):
        time.sleep(0.2)
    app = app_processes(namespace)
    assert len(app) == 1, app
    os.kill(app[0], signal.SIGSTOP)  # alive, but it makes no progress: a hang
    hung_at = time.monotonic()
    out, err = run.communicate(timeout=stall + 90)
    took = time.monotonic() - hung_at
    assert run.returncode != 0
    assert took < stall + 60, f"the hung run ended {took:.0f} s after the hang"
    node = state["nodes"][hung]["id"][:8]
    assert f"node {node} (rank {hung}): rank {hung}: no progress for {stall} s since '" in err, err
    assert not app_processes(namespace), "the hung app was left behind"

    status = make(env, "status")
    assert "failed" in status.stdout and f"rank {hung}: no progress for {stall} s" in status.stdout
    fetched = make(env, "results")
    assert fetched.returncode == 0, fetched.stderr
    partial = next(Path(env["RESULTS_DIR"]).iterdir()) / f"output-{hung}.txt"
    assert "[iteration: 3/" in partial.read_text()


def test_a_dropped_link_stops_the_watching_not_the_run(env: dict) -> None:
    """This machine loses its path to the nodes for 30 s mid-run (a laptop losing its Wi-Fi; the ranks'
    own traffic untouched): `make run` says it lost contact and leaves the run running; the training
    goes on; `make run` then re-attaches to the same run, which finishes."""
    assert make(env, "up", "setup").returncode == 0
    training = subprocess.Popen(["make", "-s", "-C", str(ROOT), "run"], env={**env, "EPOCHS": "45"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    state = json.loads(Path(env["NODES_FILE"]).read_text())
    cut = [rule for node in state["nodes"] for rule in (["OUTPUT", "-d", node["address"], "-j", "DROP"],
                                                          ["INPUT", "-s", node["address"], "-j", "DROP"])]
    try:
        run_dir = wait_for_run_log(env, "[epoch: 1/45]")
        started = {rank: json.loads((run_dir / f".rank-{rank}.json").read_text()) for rank in (0, 1)}
        for rule in cut:
            subprocess.run(["iptables", "-w", "-I", *rule], check=True)
        cut_at = time.monotonic()
        out, _ = training.communicate(timeout=60)
        size = (run_dir / "output-0.txt").stat().st_size
        time.sleep(max(0.0, 30 - (time.monotonic() - cut_at)))
    finally:
        for rule in cut:
            subprocess.run(["iptables", "-w", "-D", *rule], capture_output=True)
        if training.poll() is None:
            os.killpg(training.pid, signal.SIGKILL)
            training.wait()
    assert training.returncode != 0 and "lost contact with node" in out, out[-2000:]
    assert (run_dir / "output-0.txt").stat().st_size > size, "training stopped with the link"
    run = json.loads(Path(env["NODES_FILE"]).read_text())["runs"][-1]
    assert run["state"] == "running"

    again = make(env, "run", EPOCHS="45")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"re-attaching to run {run['id']}" in again.stdout
    for rank in (0, 1):
        assert json.loads((run_dir / f".rank-{rank}.json").read_text()) == started[rank]  # not restarted
        assert f"[rank: {rank}] Epoch 44 took:" in (run_dir / f"output-{rank}.txt").read_text()


def wait_for_run_log(env: dict, line: str, rank: int = 0, timeout: float = 120) -> Path:
    """The folder of the run that `make run` started, once rank's log shows `line`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = json.loads(Path(env["NODES_FILE"]).read_text()).get("runs") or []
        if runs:
            run_dir = Path(config.load_settings(env).user_dir) / "runs" / runs[-1]["id"]
            log = run_dir / f"output-{rank}.txt"
            if log.exists() and line in log.read_text():
                return run_dir
        time.sleep(0.5)
    raise AssertionError(f"rank {rank} never wrote {line!r}")


@pytest.fixture
def docker_engine(tmp_path: Path) -> Iterator[None]:
    """Docker running on this machine, as on most users' machines: its firewall rules in place
    (FORWARD policy DROP, bridged packets through iptables). One of ours when none runs; after the
    test, this machine's firewall, sysctl and links are as they were."""
    if subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        yield  # the machine's own
        return
    if not shutil.which("dockerd"):
        pytest.skip("dockerd is not installed (.ci/run installs docker.io)")
    policy = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout.split()[2]
    bridge_sysctl = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
    sysctl_before = bridge_sysctl.read_text() if bridge_sysctl.exists() else "0"
    had_docker0 = Path("/sys/class/net/docker0").exists()
    # Its sockets live under exec-root: a short folder of its own (a socket's path has ~100 characters).
    short = Path(tempfile.mkdtemp(prefix="dcgd-", dir="/tmp"))
    socket = short / "docker.sock"
    log = tmp_path / "dockerd.log"
    with open(log, "wb") as out:
        engine = subprocess.Popen(["dockerd", "--data-root", str(tmp_path / "data"), "--exec-root", str(short / "x"),
                                   "--pidfile", str(short / "docker.pid"), "-H", f"unix://{socket}"],
                                  stdout=out, stderr=out, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "-H", f"unix://{socket}", "info"], capture_output=True).returncode != 0:
            assert engine.poll() is None and time.monotonic() < deadline, log.read_text()[-1500:]
            time.sleep(0.5)
        # dockerd sets the DROP policy when it is the one that turns IP forwarding on, as on a fresh
        # machine; here forwarding may be on already (an earlier run): set what it would have set.
        subprocess.run(["iptables", "-P", "FORWARD", "DROP"], check=True)
        assert bridge_sysctl.read_text().strip() == "1"  # bridged packets go through iptables: Docker's rules bite
        yield
    finally:
        engine.terminate()
        engine.wait(timeout=60)
        for line in Path("/proc/mounts").read_text().splitlines():  # dockerd binds its data-root on itself
            if line.split()[1].startswith(str(tmp_path)):
                subprocess.run(["umount", line.split()[1]], check=True)
        shutil.rmtree(short, ignore_errors=True)
        remove_docker_rules(policy)
        bridge_sysctl.write_text(sysctl_before)
        if not had_docker0:
            subprocess.run(["ip", "link", "del", "docker0"], capture_output=True)


def remove_docker_rules(forward_policy: str) -> None:
    """What dockerd put in the firewall (it leaves it when it stops), and nothing else: other tests'
    rules may come and go meanwhile."""
    for table in ("filter", "nat"):
        rules = subprocess.run(["iptables", "-t", table, "-S"], capture_output=True, text=True).stdout.splitlines()
        for rule in rules:
            if rule.startswith("-A ") and ("DOCKER" in rule or "docker0" in rule):
                subprocess.run(["iptables", "-t", table, "-D", *shlex.split(rule)[1:]], check=True)
        chains = [rule.split()[1] for rule in rules if rule.startswith("-N DOCKER")]
        for chain in chains:
            subprocess.run(["iptables", "-t", table, "-F", chain], check=True)
        for chain in chains:
            subprocess.run(["iptables", "-t", table, "-X", chain], check=True)
    subprocess.run(["iptables", "-P", "FORWARD", forward_policy], check=True)


def test_docker_on_this_machine_does_not_break_the_cluster(env: dict, docker_engine: None) -> None:
    up = make(env, "up")
    assert up.returncode == 0, up.stderr
    bridge_rule = f"dcgan local cluster {subnet(251)}"
    assert bridge_rule in subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
    done = make(env, "setup", "run")  # rank to rank across the bridge: dropped without the rule
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert make(env, "down").returncode == 0
    assert bridge_rule not in subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True).stdout
