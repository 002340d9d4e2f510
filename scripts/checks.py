"""The checks every step makes before a node is started or a file is touched: the settings'
files, RESULTS_DIR, and what the provider needs (this machine's tools for the local cluster;
keys and what EC2 says of the account for AWS). Each failure is one sentence with its fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import demo_torch
import local_efs
import local_tree
from clap_configs import aws_template, check_configs
from config import Settings
from output import UserError


def preflight(settings: Settings) -> None:
    """Everything that can be checked before a node is started or a file is touched."""
    check_configs(settings)
    check_results_dir(settings)
    if settings.provider == "local":
        check_local(settings)
    else:
        check_aws(settings)


def check_results_dir(settings: Settings) -> None:
    existing = next(p for p in [settings.results_dir, *settings.results_dir.parents] if p.exists())
    try:  # a real write: root passes every permission check but not a read-only or virtual filesystem
        tempfile.TemporaryFile(dir=existing).close()
    except OSError:
        raise UserError(f"RESULTS_DIR={settings.results_dir} is not writable ({existing} is not a writable "
                        f"folder): point RESULTS_DIR at a folder you can write.") from None


def check_local(settings: Settings) -> None:
    """What the local provider needs on this machine, and the user's app and data."""
    if settings.ssh_hosts:
        key = settings.clap_path / "private" / "ssh_key"
        if not key.is_file():
            raise UserError(f"SSH_HOSTS is set but {key} is missing: put the private key that logs in "
                            f"as SSH_USER={settings.ssh_user} on those hosts there (chmod 600).")
        if key.stat().st_mode & 0o077:
            raise UserError(f"{key} is readable by others: chmod 600 {key}.")
    if os.geteuid() != 0 and not settings.ssh_hosts:
        raise UserError("the local cluster needs root (it makes network namespaces): run it as root, "
                        "e.g. `sudo make all`.")
    for tool, package in (("ip", "iproute2"), ("sshd", "openssh-server"), ("unshare", "util-linux"),
                          ("ssh", "openssh-client")):
        if not shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin"):
            raise UserError(f"`{tool}` is missing: apt-get install {package}.")
    if settings.cloud_like:
        check_cloud_like(settings)
    else:
        check_app_here(settings)


def check_app_here(settings: Settings) -> None:
    """The app, data and Python the nodes use, on this machine."""
    if "DCGAN_DIR" in settings.user_set and not Path(settings.dcgan_dir, "dist_dcgan.py").is_file():
        raise UserError(f"DCGAN_DIR={settings.dcgan_dir} has no dist_dcgan.py: point DCGAN_DIR at a clone of "
                        f"eborin/Distributed-DCGAN (or leave it empty for the demo app).")
    if "CIFAR_DATA_DIR" in settings.user_set and not test_batch(settings).is_file():
        raise UserError(f"CIFAR_DATA_DIR={settings.cifar_data_dir} has no cifar-10-batches-py/test_batch: "
                        f"extract cifar-10-python.tar.gz there (or leave it empty for a synthetic set).")
    if not shutil.which(settings.dcgan_python):
        raise UserError(f"DCGAN_PYTHON={settings.dcgan_python} is not an executable: point it at a Python "
                        f"that has torch.")
    if settings.runner == "native" and "DCGAN_PYTHON" not in settings.user_set and not settings.dry_run:
        demo_torch.install_if_missing()


def check_cloud_like(settings: Settings) -> None:
    """The cloud-like nodes' tools on this machine, and the user's app and data on the EFS stand-in."""
    missing = local_tree.needs()
    if missing:
        raise UserError(f"INSTANCE_TYPE={settings.instance_type} needs {', '.join(missing)} on this machine: "
                        f"apt-get install {' '.join(missing)}.")
    local_efs.check_app(settings)
    data = local_efs.on_export(settings, settings.cifar_data_dir)
    if "CIFAR_DATA_DIR" in settings.user_set and not (data and (data / "cifar-10-batches-py/test_batch").is_file()):
        raise UserError(f"CIFAR_DATA_DIR={settings.cifar_data_dir} has no cifar-10-batches-py/test_batch on the EFS "
                        f"stand-in ({data or 'not below EFS_MOUNT_POINT'}): extract cifar-10-python.tar.gz there "
                        f"(or leave CIFAR_DATA_DIR empty for a synthetic set).")


def test_batch(settings: Settings) -> Path:
    return Path(settings.cifar_data_dir, "cifar-10-batches-py", "test_batch")


def check_aws(settings: Settings) -> None:
    """Keys and their files' modes; then EC2 itself: the credentials, the key pair, the AMI, the
    security group, and whether the account may run, tag and terminate instances (DryRun). A wrong
    key or a missing permission fails here, not half-way through a paid cluster."""
    import aws
    import aws_account
    from aws_launch import image_of, launch_for, owner_id, run_request, security_groups

    template, provider, login = aws_template(settings)
    private = settings.clap_path / "private"
    for name, what in ((provider["access_keyfile"], "your AWS access key id"),
                       (provider["secret_access_keyfile"], "your AWS secret access key")):
        path = private / name
        if not path.is_file() or not path.read_text().strip():
            raise UserError(f"{path} is missing or empty: put {what} in it (see .env.example).")
    check_private(private / provider["secret_access_keyfile"])
    if not settings.keypair_name:
        raise UserError("KEYPAIR_NAME is empty: set it in .env to the name of your EC2 key pair.")
    key = private / login["keypair_private_file"]
    public = private / login["keypair_public_file"]
    if not key.is_file():
        raise UserError(f"{key} is missing: put the private key of key pair {settings.keypair_name} there.")
    check_private(key)
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True)
    if derived.returncode != 0:
        raise UserError(f"{key} is not a private key ssh can read: put the key pair's .pem there.")
    if not public.is_file() or public.read_text().split()[:2] != derived.stdout.split()[:2]:
        raise UserError(f"{public} does not match {key}: write it with ssh-keygen -y -f {key} > {public}.")
    region = provider["region"]
    if region not in aws.boto3.session.Session().get_available_regions("ec2"):
        raise UserError(f"region {region!r} in {settings.clap_path / 'configs' / 'providers.yaml'} "
                        f"is not an EC2 region: use one like us-east-1.")
    if settings.runner == "docker" and not settings.efs_host:
        raise UserError("EFS_HOST is empty: set it in .env to the IP address of your EFS mount target "
                        "(the docker runner reads the app and data from it).")
    instances_file = settings.clap_path / "configs" / "instances.yaml"
    with aws.aws_errors():
        session = aws.session_from_clap_config(settings.clap_path, template["provider"])
        client = aws.client(session, "ec2")
        aws_account.check_credentials(client)
        if not aws_account.key_pair_exists(client, settings.keypair_name):
            raise UserError(f"KEYPAIR_NAME={settings.keypair_name}: EC2 has no key pair of that name in {region}: "
                            f"import key.pub there (EC2 console > Key pairs > Import) or name an existing one.")
        image = image_of(session, client, str(template["image_id"]))
        group = template.get("security_group")
        closed = aws_account.groups_closed_to_members(client, group) if group else []
    if closed is None:
        raise UserError(f"security group {group} (INSTANCE_TYPE={settings.instance_type} in {instances_file}) does "
                        f"not exist in {region}: create it with an all-TCP rule from the group itself, or name an "
                        f"existing one there.")
    if closed:
        raise UserError(f"security group {group} ({', '.join(closed)}) does not let its members reach each other on "
                        f"every TCP port, which the training (gloo) needs: add an inbound rule to it: type All TCP, "
                        f"source {closed[0]} (the group itself).")
    # What `up` will ask, asked with DryRun: the launch with its tags, a tag, a termination.
    launch = launch_for(settings, {"cluster_id": "c-check", "created": time.time()}, owner_id(settings) or "o-check")
    made_up = "i-0123456789abcdef0"  # no instance of ours may exist yet: EC2 checks the permission first
    with aws.aws_errors():
        request = run_request(launch, template, settings.keypair_name, image, 1, security_groups(client, template))
        aws_account.dry_run(client, "run_instances", **request)
        aws_account.dry_run(client, "create_tags", Resources=[made_up],
                            Tags=[{"Key": aws.TAG_PROJECT, "Value": "check"}])
        aws_account.dry_run(client, "terminate_instances", InstanceIds=[made_up])


def check_private(path: Path) -> None:
    """A key file only its owner may read (0600 or 0400), as ssh demands of key.pem."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UserError(f"{path} is readable by others (mode {mode:04o}): chmod 600 {path}.")
