"""Values reach the app as written: paths with spaces, arguments with quotes, and no second command
smuggled through APP_ARGS (the rank command goes through `sh -c`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import config
import output
import role
from conftest import ROOT, failure_messages, play, role_cluster

ARGV_PRINTER = "#!/bin/sh\nexec {python} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' \"$@\"\n"


def rendered_command(tmp_path: Path, **settings: str) -> tuple[config.Settings, str]:
    """The native rank command of rank 0 as DRY_RUN shows it, without the watchdog's environment."""
    env = {"ENV_FILE": os.devnull, "CLAP_PATH": str(ROOT / "clap_config"), "PROVIDER": "local", **settings}
    loaded = config.load_settings(env)
    state = {"nodes": [{"id": "a" * 32, "rank": 0, "address": "10.0.0.2", "private_address": "10.0.0.2"}]}
    extra = role.role_vars(loaded, state, "run", "run-1")
    command = role.rank_command(loaded, state, extra, role.node_vars(state)["a" * 32])
    return loaded, command.partition(" PYTHONUNBUFFERED=1 ")[2]


def test_paths_with_spaces_and_quoted_arguments_reach_the_app_as_written(tmp_path: Path) -> None:
    folder = tmp_path / "my folder"
    folder.mkdir()
    printer = folder / "python"  # stands for DCGAN_PYTHON: prints the arguments it was given
    printer.write_text(ARGV_PRINTER.format(python=sys.executable))
    printer.chmod(0o755)
    marker = tmp_path / "owned"
    _, command = rendered_command(
        tmp_path, DCGAN_PYTHON=str(printer), DCGAN_DIR=str(folder / "the app"),
        CIFAR_DATA_DIR=str(folder / "da'ta"), USER_DIR=str(folder / "user dir"),
        APP_ARGS=f"--name 'two words' --x; touch {marker}")
    done = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True, timeout=30)
    argv = json.loads(done.stdout)
    assert argv[argv.index("--rdzv-conf") + 2] == f"{folder}/the app/dist_dcgan.py"
    assert argv[argv.index("--dataroot") + 1] == f"{folder}/da'ta"
    assert argv[argv.index("--out_folder") + 1] == f"{folder}/user dir/runs/run-1"
    assert argv[argv.index("--out_folder") + 2:] == ["--name", "two words", "--x;", "touch", str(marker)]
    assert not marker.exists()


def test_app_args_with_an_unclosed_quote_is_one_clear_sentence() -> None:
    message = r"""APP_ARGS="--name 'x" does not split into arguments .*close the quote"""
    with pytest.raises(output.UserError, match=message):
        config.load_settings({"ENV_FILE": os.devnull, "APP_ARGS": "--name 'x"})


@pytest.fixture(scope="module")
def spaced_cluster(hosts: list, ssh_key: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    with role_cluster(hosts, ssh_key, tmp_path_factory.mktemp("quoting")) as cluster:
        app = cluster["work"] / "the app"
        shutil.copytree(ROOT / "demo", app, ignore=shutil.ignore_patterns("__pycache__"))
        cluster["user_dir"] = Path(cluster["vars"]["efs_mount_point"]) / "user's dir"
        cluster["vars"].update(dcgan_dir=str(app), user_dir=str(cluster["user_dir"]))
        yield cluster


def test_a_real_run_in_folders_with_spaces(spaced_cluster: dict) -> None:
    setup = play(spaced_cluster, "setup")
    assert setup.status == "successful", failure_messages(setup)
    result = play(spaced_cluster, "run", run_id="r1", epochs=1, master_hostname=spaced_cluster["ids"][0],
                  app_args=["--max_workers", "0"])
    assert result.status == "successful", failure_messages(result)
    log = (spaced_cluster["user_dir"] / "runs" / "r1" / "output-1.txt").read_text()
    assert "[rank: 1] Epoch 0 took:" in log
