"""CLAP's configuration files under CLAP_PATH: providers, logins, instance templates and the
role's actions file, read with the line of a mistake named."""

from __future__ import annotations

from pathlib import Path

import yaml

from config import Settings
from output import UserError

ROLE = "dcgan"  # the role of CLAP_PATH/roles that this project plays


def read_yaml(path: Path) -> dict:
    """A CLAP config or role file, with the line of a syntax error named."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: restore it from git (git checkout -- {path}).") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", error)
        raise UserError(f"{path}{where} is not valid YAML ({problem}): fix that line.") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of names to settings: fix its content.")
    return data


def check_configs(settings: Settings) -> dict:
    """Every CLAP file parses, and INSTANCE_TYPE names a template of PROVIDER. Returns the template."""
    configs = settings.clap_path / "configs"
    providers = read_yaml(configs / "providers.yaml")
    read_yaml(configs / "logins.yaml")
    instances = read_yaml(configs / "instances.yaml")
    read_yaml(settings.clap_path / "roles" / "actions.d" / f"{ROLE}.yml")
    template = instances.get(settings.instance_type)
    if template is None:
        choices = ", ".join(sorted(instances))
        raise UserError(f"INSTANCE_TYPE={settings.instance_type!r} is not in {configs / 'instances.yaml'}: "
                        f"use one of {choices}.")
    kind = providers.get(template.get("provider"), {}).get("provider")
    if kind != settings.provider:
        raise UserError(f"INSTANCE_TYPE={settings.instance_type} belongs to provider {kind!r}, not "
                        f"PROVIDER={settings.provider}: pick a template of {settings.provider}.")
    return template


def aws_template(settings: Settings) -> tuple[dict, dict, dict]:
    """The instance template of INSTANCE_TYPE, its provider and its login entries."""
    configs = settings.clap_path / "configs"
    template = read_yaml(configs / "instances.yaml")[settings.instance_type]
    return (template, read_yaml(configs / "providers.yaml")[template["provider"]],
            read_yaml(configs / "logins.yaml")[template["login"]])
