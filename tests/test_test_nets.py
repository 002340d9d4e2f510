"""The tests' own subnets: each pytest-xdist worker of each test session takes subnets no other one uses."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, worker_net


def test_one_octet_gives_each_worker_the_next_octet_ending_in_its_digit() -> None:
    assert [worker_net("214", worker) for worker in range(3)] == ["214", "224", "234"]


def test_sessions_with_different_last_digits_never_share_a_subnet() -> None:
    """The octets the team uses at once (213 to 216), two workers each: eight different octets."""
    taken = [worker_net(str(octet), worker) for octet in (213, 214, 215, 216) for worker in range(2)]
    assert len(set(taken)) == len(taken)


def test_a_list_gives_each_worker_its_own_octet() -> None:
    assert [worker_net("214, 234", worker) for worker in range(2)] == ["214", "234"]
    with pytest.raises(ValueError, match=r"DCGAN_TEST_NET=214, 234 lists 2 octets but test worker 3 needs one"):
        worker_net("214, 234", 2)


@pytest.mark.parametrize(("setting", "worker", "message"), [
    ("250", 1, r"DCGAN_TEST_NET=250 gives test worker 2 the octet 260, above 255: pick a lower octet"),
    ("ten", 0, r"DCGAN_TEST_NET='ten' must be an octet \(like 214\) or a comma-separated list"),
    ("214,", 0, r"DCGAN_TEST_NET='214,' must be an octet"),
])
def test_a_setting_that_leaves_a_worker_without_a_subnet_is_refused(setting: str, worker: int,
                                                                     message: str) -> None:
    with pytest.raises(ValueError, match=message):
        worker_net(setting, worker)


def test_pytest_refuses_a_setting_too_high_for_its_workers_before_any_test() -> None:
    env = {**os.environ, "DCGAN_TEST_NET": "250"}
    env.pop("PYTEST_XDIST_WORKER", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "-p", "no:cacheprovider",
                           "tests/test_test_nets.py::test_one_octet_gives_each_worker_the_next_octet_ending_in_its_digit"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "DCGAN_TEST_NET=250 gives test worker 2 the octet 260, above 255" in done.stderr
    assert "passed" not in done.stdout
