"""A run's logs: every rank's output-<rank>.txt in the run's folder on the shared filesystem."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from cluster import Clap, clap
from cluster_state import node_ids
from config import Settings
from output import UserError


def run_folder(settings: Settings, run_id: str) -> str:
    return f"{settings.user_dir}/runs/{run_id}"


def read_run_logs(settings: Settings, state: dict, run_id: str, handles: Clap | None = None) -> dict[int, str]:
    """Every rank's output-<rank>.txt of a run, as it is now."""
    return RunLogs(settings, state, run_id, handles).read()


class RunLogs:
    """Every rank's output-<rank>.txt of a run, read where the shared filesystem is, and each
    read brings only what was written since the last: the cost does not grow with the run.

    On the local cluster that is this machine; elsewhere one SSH command on rank 0
    (no Ansible: this is polled while training runs).
    """

    def __init__(self, settings: Settings, state: dict, run_id: str, handles: Clap | None = None) -> None:
        self.settings, self.state, self.handles = settings, state, handles
        self.folder = run_folder(settings, run_id)
        self.texts: dict[int, str] = {}
        self.sizes: dict[int, int] = {}  # bytes read of each rank's log

    def read(self) -> dict[int, str]:
        new = self._read_here() if self.settings.shares_this_filesystem else self._read_on_master()
        for rank, (size, text) in new.items():
            self.sizes[rank] = size
            self.texts[rank] = self.texts.get(rank, "") + text
        return dict(self.texts)

    def _read_here(self) -> dict[int, tuple[int, str]]:
        new = {}
        for rank in range(len(self.state["nodes"])):
            try:
                with open(Path(self.folder, f"output-{rank}.txt"), "rb") as log:
                    log.seek(self.sizes.get(rank, 0))
                    chunk = log.read()
            except FileNotFoundError:
                continue
            new[rank] = (self.sizes.get(rank, 0) + len(chunk), chunk.decode(errors="replace"))
        return new

    def _read_on_master(self) -> dict[int, tuple[int, str]]:
        self.handles = self.handles or clap(self.settings, self.state)
        from clap.executor import SSHCommandExecutor

        master = self.handles.node_manager.get_nodes_by_id(node_ids(self.state)[:1])
        # Per rank a header with the log's size, then its bytes from where the last read stopped.
        reads = "; ".join(
            f"f=output-{rank}.txt; [ -f $f ] && s=$(stat -c %s $f) && printf '\\n==> {rank} %s <==\\n' $s && "
            f"tail -c +{self.sizes.get(rank, 0) + 1} $f | head -c $((s - {self.sizes.get(rank, 0)}))"
            for rank in range(len(self.state["nodes"])))
        command = f"cd {shlex.quote(self.folder)} 2>/dev/null || exit 0; {reads}; true"
        result = SSHCommandExecutor(command, master, str(self.settings.clap_path / "private"),
                                    connection_timeout=10, execution_timeout=30).run()[master[0].node_id]
        if not result.ok:
            raise UserError(f"cannot read the logs on rank 0 ({result.error}): is the node up? `make status`.")
        parts = re.split(r"\n==> (\d+) (\d+) <==\n", "".join(result.stdout_lines or []))
        return {int(rank): (int(size), text) for rank, size, text in zip(parts[1::3], parts[2::3], parts[3::3],
                                                                          strict=True)}
