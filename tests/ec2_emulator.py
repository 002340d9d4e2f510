"""A loopback-only EC2 emulator (moto) that our EC2 provider and scripts/aws.py talk to.

Why it looks like this:
- Every client is boto3 (the provider, the checks, the tests), and botocore takes the
  endpoint from AWS_ENDPOINT_URL for every service: EC2, SSM and IAM all reach the
  one moto server. moto picks the service and region from the SigV4 scope boto3 signs.
- moto knows no Canonical SSM parameters: the server is seeded with Canonical's
  Ubuntu 24.04 LTS parameter (UBUNTU_LTS_PARAMETER), naming an AMI registered for it,
  as AWS's public parameter names the current Ubuntu LTS AMI.
- Nothing here may reach the outside: the server and every client run inside a
  fresh network namespace that has only `lo`.  The instances' "public" IPs are
  fake; never connect to them.  The course's path (tests/test_cloud_path.py) serves
  on this machine's own 127.0.0.1 instead (`isolated=False`), so that `make` reaches
  both the emulator and the cloud-like nodes that play its instances, in a subnet
  of the test's own (no public addresses there).

Use `ec2_emulator()` (a context manager) from tests; run clients with
`Ec2Emulator.run()` / `Ec2Emulator.python()`, which wrap `ip netns exec`.
The module is also the server's entry point: `python ec2_emulator.py serve ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_REGION = "us-east-1"
LOOPBACK = "127.0.0.1"
# The template's default image: Canonical's public parameter, and the AMI the server gives it.
UBUNTU_LTS_PARAMETER = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
UBUNTU_LTS_AMI = "ami-0b2404c0ffee24040"
CANONICAL = "099720109477"

# Variables that would steer a client somewhere else than the emulator or
# override the credentials the project reads from its key files (a profile,
# a proxy).  Dropped from every client environment.
_SCRUB_PREFIXES = ("AWS_", "EC2_", "BOTO_")
_SCRUB_NAMES = {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"}


# ----------------------------------------------------------------- server side
def _seed_ubuntu_lts(region: str) -> None:
    """Put Canonical's Ubuntu LTS parameter and its AMI into moto, as AWS has them."""
    import datetime

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.amis import Ami
    from moto.ssm.models import Parameter, ssm_backends

    ec2 = ec2_backends[DEFAULT_ACCOUNT_ID][region]
    ec2.amis[UBUNTU_LTS_AMI] = Ami(
        ec2, UBUNTU_LTS_AMI, name="ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20261101",
        owner_id=CANONICAL, public=True, architecture="x86_64", virtualization_type="hvm",
        root_device_type="ebs", root_device_name="/dev/sda1")
    ssm_backends[DEFAULT_ACCOUNT_ID][region]._parameters[UBUNTU_LTS_PARAMETER].append(Parameter(
        account_id=DEFAULT_ACCOUNT_ID, name=UBUNTU_LTS_PARAMETER, value=UBUNTU_LTS_AMI, parameter_type="String",
        description=None, allowed_pattern=None, keyid=None, last_modified_date=datetime.datetime.now(),
        version=1, data_type="aws:ec2:image"))


def _serve(host: str, port: int, region: str) -> None:
    """Run moto's WSGI app; print `READY <port>` once listening."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    app = DomainDispatcherApplication(create_backend_app)
    _seed_ubuntu_lts(region)
    # make_server binds and listens in its constructor: connections made after
    # READY is printed queue up even before serve_forever() runs.
    server = make_server(host, port, app, threaded=True)
    os.environ["MOTO_PORT"] = str(server.port)  # moto uses it for self-calls
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"READY {server.port}", flush=True)
    # Nobody reads the pipe after READY: send later prints (moto has some) to
    # the log on stderr instead of letting them fill the pipe and block us.
    os.dup2(2, 1)
    try:
        server.serve_forever()
    finally:
        server.server_close()


# ----------------------------------------------------------------- client side
class EmulatorError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


def _alive(pid: int) -> bool:
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_pid(pid: int, grace: float = 3.0) -> None:
    """SIGTERM then SIGKILL one process we started; ignore it if already gone."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def client_env(endpoint: str, region: str, workdir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a client (boto3, the steps) that must use the emulator.

    No credentials are set: callers pass their own (the steps read CLAP's key files).
    """
    env = {
        k: v
        for k, v in (base if base is not None else os.environ).items()
        if not k.upper().startswith(_SCRUB_PREFIXES) and k.upper() not in _SCRUB_NAMES
    }
    # ansible-playbook (run by CLAP through ansible-runner) must be found on PATH.
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "/usr/bin:/bin")])
    env.update(
        {
            "AWS_ENDPOINT_URL": endpoint,  # botocore's own: every service, every client
            "AWS_DEFAULT_REGION": region,
            # botocore: no ~/.aws profiles, no 169.254.169.254 lookups.
            "AWS_CONFIG_FILE": str(workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(workdir / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "*",
            "no_proxy": "*",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@dataclass
class Ec2Emulator:
    netns: str | None  # None: on this machine's loopback (isolated=False)
    endpoint: str
    region: str
    pid: int
    workdir: Path
    env: dict[str, str] = field(repr=False)
    log: Path = field(repr=False)

    def run(
        self,
        argv: list[str],
        *,
        extra_env: dict[str, str] | None = None,
        timeout: float = 120,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command where the emulator listens (its namespace, or this machine) with the client env.

        Not for concurrent use: afterwards it kills whatever else is left in
        the namespace (everything there but the server was started by us).
        """
        env = {**self.env, **(extra_env or {})}
        cmd = [*self.prefix, *argv]
        try:
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
        finally:
            # A timed-out command may leave children (ansible workers) behind.
            self.kill_stragglers()

    def python(
        self, code: str, *, extra_env: dict[str, str] | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet (with this interpreter) where the emulator listens."""
        return self.run([sys.executable, "-c", code], extra_env=extra_env, timeout=timeout)

    def python_json(self, code: str, *, extra_env: dict[str, str] | None = None, timeout: float = 120) -> Any:
        """Run a snippet whose last stdout line is JSON; raise with its output if it fails."""
        proc = self.python(code, extra_env=extra_env, timeout=timeout)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise EmulatorError(
                f"snippet failed (rc={proc.returncode})\n--- stdout\n{proc.stdout[-4000:]}"
                f"\n--- stderr\n{proc.stderr[-4000:]}"
            )
        return json.loads(lines[-1])

    @property
    def prefix(self) -> list[str]:
        """What runs a command where the emulator listens."""
        return ["ip", "netns", "exec", self.netns] if self.netns else []

    def netns_pids(self) -> list[int]:
        if self.netns is None:
            return []  # no namespace of ours: nothing to sweep
        out = _ip("netns", "pids", self.netns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_stragglers(self) -> None:
        """Kill every process left in our namespace except the server (all ours)."""
        for pid in self.netns_pids():
            if pid != self.pid:
                _kill_pid(pid, grace=1.0)


def _wait_ready(proc: subprocess.Popen[str], deadline: float) -> int:
    """Read the server's `READY <port>` line, failing at the deadline or on exit."""
    assert proc.stdout is not None
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise EmulatorError("moto server did not start listening in time")
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            continue
        line = proc.stdout.readline()
        if not line:
            raise EmulatorError(f"moto server exited early (rc={proc.wait(timeout=5)})")
        if line.startswith("READY "):
            return int(line.split()[1])


def _delete_netns(name: str) -> None:
    for pid in [int(p) for p in _ip("netns", "pids", name, check=False).stdout.split()]:
        _kill_pid(pid, grace=1.0)
    _ip("netns", "del", name, check=False)


def _sweep_stale_netns() -> None:
    """Delete namespaces of ours whose creating process died without teardown (SIGKILL)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(r"clapemu-(\d+)-[0-9a-f]{6}", name)
        if match and not _alive(int(match.group(1))):
            _delete_netns(name)


@contextmanager
def ec2_emulator(
    region: str = DEFAULT_REGION,
    port: int = 0,
    start_timeout: float = 30.0,
    validate_keypair: bool = True,
    validate_instance_type: bool = True,
    validate_ami: bool = False,
    isolated: bool = True,
) -> Iterator[Ec2Emulator]:
    """Start moto in a fresh loopback-only namespace (isolated=False: on this machine's 127.0.0.1);
    yield how to reach it; tear down.

    The validations make moto refuse what AWS refuses (unknown key pair or
    instance type); AMI validation is off because moto only knows its own
    image list and CLAP configs name real AMIs.
    """
    if os.geteuid() != 0:
        raise EmulatorError("creating a network namespace needs root")
    if shutil.which("ip") is None:
        raise EmulatorError("iproute2 `ip` not found")
    _sweep_stale_netns()
    netns = f"clapemu-{os.getpid()}-{secrets.token_hex(3)}" if isolated else None
    workdir = Path(tempfile.mkdtemp(prefix="clapemu."))
    log = workdir / "moto.log"
    proc: subprocess.Popen[str] | None = None
    try:
        if netns:
            _ip("netns", "add", netns)
    except subprocess.CalledProcessError as e:
        shutil.rmtree(workdir, ignore_errors=True)
        raise EmulatorError(f"ip netns add failed: {e.stderr.strip()}") from None
    prefix = ["ip", "netns", "exec", netns] if netns else []
    try:
        if netns:
            _ip("netns", "exec", netns, "ip", "link", "set", "lo", "up")
        server_env = client_env(f"http://{LOOPBACK}:0", region, workdir)
        flags = {
            "MOTO_ENABLE_KEYPAIR_VALIDATION": validate_keypair,
            "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION": validate_instance_type,
            "MOTO_ENABLE_AMI_VALIDATION": validate_ami,
        }
        server_env.update({k: "1" for k, on in flags.items() if on})
        with open(log, "w") as logf:
            # `ip netns exec` execs the command, so proc.pid is the server itself.
            proc = subprocess.Popen(
                [*prefix, sys.executable, str(Path(__file__).resolve()),
                 "serve", "--host", LOOPBACK, "--port", str(port), "--region", region],
                stdout=subprocess.PIPE, stderr=logf, text=True, env=server_env,
            )  # fmt: skip
        bound = _wait_ready(proc, time.monotonic() + start_timeout)
        endpoint = f"http://{LOOPBACK}:{bound}"
        yield Ec2Emulator(
            netns=netns,
            endpoint=endpoint,
            region=region,
            pid=proc.pid,
            workdir=workdir,
            env=client_env(endpoint, region, workdir),
            log=log,
        )
    finally:
        if proc is not None:
            _kill_pid(proc.pid)
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        if netns:
            _delete_netns(netns)
        shutil.rmtree(workdir, ignore_errors=True)


def netns_exists(name: str) -> bool:
    return name in _ip("netns", "list", check=False).stdout.split()


def write_clap_config(
    clap_path: Path,
    *,
    region: str = DEFAULT_REGION,
    access_key: str = "AKIAEMULATOR00000000",
    secret_key: str = "emulator-secret",
    keypair_name: str = "clap-emu-key",
    security_group: str = "clap-emu-sg",
    image_id: str = "ami-12c6146b",
    flavors: Iterable[str] = ("t2.medium",),
) -> None:
    """A throwaway CLAP_PATH with an `aws` provider, a login and `type-<flavor>` instances.

    The login needs a non-empty keypair_name: CLAP drops every template of a login without one.
    """
    for sub in ("configs", "private", "storage", "roles/actions.d"):
        (clap_path / sub).mkdir(parents=True, exist_ok=True)
    private = clap_path / "private"
    (private / "aws_access_key.pub").write_text(access_key + "\n")
    (private / "aws_secret_key").write_text(secret_key + "\n")
    (private / "aws_secret_key").chmod(0o600)
    (private / f"{keypair_name}.pem").write_text("not a real key\n")
    (private / f"{keypair_name}.pem").chmod(0o600)
    (private / f"{keypair_name}.pub").write_text("ssh-rsa AAAA not-a-real-key\n")
    (clap_path / "configs" / "providers.yaml").write_text(
        "aws-emu:\n"
        "  provider: aws\n"
        f"  region: {region}\n"
        "  access_keyfile: aws_access_key.pub\n"
        "  secret_access_keyfile: aws_secret_key\n"
    )
    (clap_path / "configs" / "logins.yaml").write_text(
        "login-emu:\n"
        "  user: ubuntu\n"
        f"  keypair_name: {keypair_name}\n"
        f"  keypair_public_file: {keypair_name}.pub\n"
        f"  keypair_private_file: {keypair_name}.pem\n"
    )
    (clap_path / "configs" / "instances.yaml").write_text(
        "".join(
            f"type-{flavor}:\n"
            "  provider: aws-emu\n"
            "  login: login-emu\n"
            f"  flavor: {flavor}\n"
            f"  image_id: {image_id}\n"
            f"  security_group: {security_group}\n"
            for flavor in flavors
        )
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    serve = sub.add_parser("serve", help="run the server (inside a namespace)")
    serve.add_argument("--host", default=LOOPBACK)
    serve.add_argument("--port", type=int, default=0)
    serve.add_argument("--region", default=DEFAULT_REGION)
    args = parser.parse_args(argv)
    if args.host != LOOPBACK:
        parser.error("the emulator only listens on 127.0.0.1")
    _serve(args.host, args.port, args.region)


if __name__ == "__main__":
    main()
