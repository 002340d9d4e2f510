"""make setup: play the dcgan role's setup on every node (idempotent: a re-run changes nothing)."""

from __future__ import annotations

import argparse
from pathlib import Path

import checks
import clap_configs
import cluster
import cluster_state
import config
import local_efs
import output
import role
from output import UserError


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    settings = config.load_settings()
    with cluster_state.exclusive(settings, "setup"):
        state = cluster_state.need_nodes(settings, "setup")
        checks.preflight(settings)
        if settings.dry_run:
            role.show_plan(settings, state, "setup")
            return 0
        if settings.cloud_like:
            local_efs.stage(settings)
        elif settings.synthetic_data:
            local_efs.make_synthetic_data(settings, Path(settings.cifar_data_dir))
        handles = cluster.clap(settings, state)
        ids = cluster_state.node_ids(state)
        args = {"node_vars": role.node_vars(state), "extra_args": role.role_vars(settings, state, "setup")}
        with cluster_state.recording(settings, state, "setup"):
            assigned = set(handles.role_manager.get_role_nodes(clap_configs.ROLE, ids).get(clap_configs.ROLE, []))
            new = [i for i in ids if i not in assigned]
            if not new:
                result = role.play(settings, handles, state, "setup")
                if not result.ok:
                    raise UserError(f"setup failed: {role.playbook_failure(result, state)}")
            else:
                from clap.role_manager import RoleAssignmentError

                with cluster.ansible_log(settings, "setup") as log:
                    try:
                        # a grown cluster: only the new nodes are set up
                        handles.role_manager.add_role(clap_configs.ROLE, new, quiet=not settings.verbose, **args)
                    except RoleAssignmentError:
                        raise UserError(f"setup failed: {role.logged_failure(log)}; fix it, then "
                                        f"`make setup` again.") from None
    played = f"{len(new)} new of {len(ids)}" if 0 < len(new) < len(ids) else f"{len(ids)}"
    output.say(f"setup done on {played} nodes in {state['steps']['setup']['seconds']:.1f} s; next: make run")
    return 0


if __name__ == "__main__":
    output.main_guard(main)
