"""Where CLAP comes from: the submodule filled by `make deps`, or the pinned archive for the tests,
and CI failing (not skipping) the CLAP tests when there is no CLAP at all."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import clap_source
from conftest import ROOT, need_root

MARKER = Path("app", "cli", "modules", "node.py")


def fake_archive(path: Path) -> str:
    """A tar.gz shaped like the pinned one (one folder, CLAP/); returns its sha256."""
    with tarfile.open(path, "w:gz") as tar:
        data = b"# CLAP's node module\n"
        info = tarfile.TarInfo(f"CLAP/{MARKER}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def no_clap_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAP", raising=False)


def test_pinned_archive_unpacks_once_after_its_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       no_clap_env: None) -> None:
    archive = tmp_path / "CLAP-test.tar.gz"
    monkeypatch.setattr(clap_source, "ARCHIVE_SHA256", fake_archive(archive))
    root = tmp_path / "project"
    (root / "CLAP").mkdir(parents=True)  # the submodule, empty as in a clone without network

    checkout = clap_source.for_tests(root, archive)

    assert checkout is not None and (checkout / MARKER).is_file()
    assert checkout.is_relative_to(root / ".cache")
    archive.unlink()  # a second call reuses what was unpacked
    assert clap_source.for_tests(root, archive) == checkout
    assert [p.name for p in (root / ".cache").iterdir()] == [checkout.parent.name]  # no staging left


def test_archive_with_another_checksum_is_refused_and_nothing_unpacked(tmp_path: Path, no_clap_env: None) -> None:
    archive = tmp_path / "CLAP-test.tar.gz"
    fake_archive(archive)  # not the pinned content
    root = tmp_path / "project"
    with pytest.raises(SystemExit, match=r"sha256 .* not the pinned"):
        clap_source.for_tests(root, archive)
    assert not list((root / ".cache").glob("clap-*"))


def test_users_clap_and_a_filled_submodule_win_over_the_archive(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "CLAP-test.tar.gz"
    monkeypatch.setattr(clap_source, "ARCHIVE_SHA256", fake_archive(archive))
    root = tmp_path / "project"
    (root / "CLAP" / MARKER).parent.mkdir(parents=True)
    (root / "CLAP" / MARKER).touch()
    monkeypatch.setenv("CLAP", "/opt/my-clap")
    assert clap_source.for_tests(root, archive) == Path("/opt/my-clap")
    monkeypatch.delenv("CLAP")
    assert clap_source.for_tests(root, archive) == root / "CLAP"
    assert not (root / ".cache").exists()


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "protocol.file.allow=always", *args], cwd=cwd, check=True,
                   capture_output=True, text=True)


@pytest.fixture
def clone_with_empty_submodule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clone of a project whose CLAP submodule points at a local repository, as a fresh clone is."""
    for name, value in (("GIT_AUTHOR_NAME", "t"), ("GIT_AUTHOR_EMAIL", "t@t"), ("GIT_COMMITTER_NAME", "t"),
                        ("GIT_COMMITTER_EMAIL", "t@t"), ("GIT_CONFIG_COUNT", "1"),
                        ("GIT_CONFIG_KEY_0", "protocol.file.allow"), ("GIT_CONFIG_VALUE_0", "always")):
        monkeypatch.setenv(name, value)
    upstream = tmp_path / "clap-upstream"
    (upstream / MARKER).parent.mkdir(parents=True)
    (upstream / MARKER).write_text("# CLAP\n")
    git("init", "-q", cwd=upstream)
    git("add", ".", cwd=upstream)
    git("commit", "-qm", "clap", cwd=upstream)
    project = tmp_path / "project"
    project.mkdir()
    git("init", "-q", cwd=project)
    git("submodule", "add", "-q", str(upstream), "CLAP", cwd=project)
    git("commit", "-qm", "project", cwd=project)
    git("clone", "-q", str(project), str(tmp_path / "clone"), cwd=tmp_path)
    return tmp_path / "clone"


def test_deps_fills_an_empty_submodule(clone_with_empty_submodule: Path, no_clap_env: None) -> None:
    clone = clone_with_empty_submodule
    assert not (clone / "CLAP" / MARKER).exists()
    assert clap_source.fill(clone) is None
    assert (clone / "CLAP" / MARKER).is_file()


def test_deps_says_how_to_get_clap_when_the_fetch_fails(clone_with_empty_submodule: Path, no_clap_env: None) -> None:
    clone = clone_with_empty_submodule
    git("config", "submodule.CLAP.url", str(clone.parent / "nowhere"), cwd=clone)  # as with no network
    problem = clap_source.fill(clone)
    assert problem is not None
    assert "`git submodule update --init` failed" in problem and "set CLAP=" in problem
    assert not (clone / "CLAP" / MARKER).exists()


def test_deps_says_how_to_get_clap_outside_a_git_clone(tmp_path: Path, no_clap_env: None) -> None:
    problem = clap_source.fill(tmp_path)
    assert problem is not None and "not a git clone" in problem and "set CLAP=" in problem


def test_ci_fails_a_clap_test_when_clap_is_missing(tmp_path: Path) -> None:
    need_root()  # the CLAP end-to-end tests first need root, then CLAP
    env = {**os.environ, "CI": "true", "CLAP": str(tmp_path / "no-clap")}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_clap_e2e.py", "-k", "test_make_all_trains"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout[-2000:]
    assert "CI runs every CLAP test" in done.stdout
    assert " skipped" not in done.stdout.splitlines()[-1]
