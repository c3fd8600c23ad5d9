"""Flow runs started through the server may only name paths inside the roots that the worker's operator allows.

A deployment's parameters come from anyone who can reach the server (the UI's Custom run). So a run of a deployment
keeps `artifacts`, `config_file` and the config's local paths inside allowed roots, and fails before any work when
one escapes. The CLI, run by a user on their own machine, calls the same flows directly and is not confined.

The roots come from the flow run's environment (the worker's, plus prefect.yaml's job env):
  SUNLEARN_ARTIFACTS     the artifact root (default: `artifacts` in the working directory, the checkout)
  SUNLEARN_CONFIG_ROOTS  folders config files may come from, `:`-separated, besides the checkout's configs/
  SUNLEARN_DATA_ROOTS    folders that data.path, model.name and the other local paths may name, `:`-separated,
                         besides the artifact root (a model saved by an earlier run)
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from stages.config import Config, ConfigError, load_config
from stages.environment import REPO

DEFAULT_ARTIFACTS = "artifacts"
# config keys that name local files or folders; the first three may name a hub id (`org/name`) instead, which passes
PATH_KEYS = ("data.path", "model.name", "model.retain_name", "evaluate.retain_logs", "unlearn.hostfile")
HUB_KEYS = PATH_KEYS[:3]


class ParameterError(ConfigError):
    """A flow-run parameter names a path outside its allowed roots."""


@dataclass(frozen=True)
class Roots:
    artifacts: str
    configs: tuple[str, ...]
    data: tuple[str, ...]

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Roots:
        artifacts = _resolve(env.get("SUNLEARN_ARTIFACTS") or DEFAULT_ARTIFACTS)
        configs = (_resolve(str(REPO / "configs")), *_resolve_list(env.get("SUNLEARN_CONFIG_ROOTS", "")))
        return cls(artifacts, configs, (artifacts, *_resolve_list(env.get("SUNLEARN_DATA_ROOTS", ""))))


def started_through_server() -> bool:
    """True inside a flow run of a deployment, which is what a worker runs; False for the CLI's direct call."""
    from prefect.runtime import deployment

    return deployment.id is not None


def load_confined(preset: str, config_file: str | None, overrides: Sequence[str], artifacts: str) -> Config:
    """`load_config`; in a flow run started through the server, first check that every path stays in its root."""
    if not started_through_server():
        return load_config(preset, config_file, overrides)
    roots = Roots.from_env()
    check_parameters(artifacts, config_file, roots)  # before load_config reads the config file
    cfg = load_config(preset, config_file, overrides)
    check_config_paths(cfg, roots)
    return cfg


def check_parameters(artifacts: str, config_file: str | None, roots: Roots) -> None:
    if not _inside(artifacts, (roots.artifacts,)):
        raise ParameterError(_outside("parameter artifacts", artifacts, (roots.artifacts,), "SUNLEARN_ARTIFACTS"))
    if config_file is not None and not _inside(config_file, roots.configs, urls=False):
        raise ParameterError(_outside("parameter config_file", config_file, roots.configs, "SUNLEARN_CONFIG_ROOTS"))


def check_config_paths(cfg: Config, roots: Roots) -> None:
    for key in PATH_KEYS:
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if _is_local_path(key, value) and not _inside(value, roots.data, urls=False):
            raise ParameterError(_outside(f"config key {key}", value, roots.data, "SUNLEARN_DATA_ROOTS"))


def _is_local_path(key: str, value: str | None) -> bool:
    """The stages' own rule for a key that takes a hub id: a value that starts like a path, or names something that
    exists, is a local path."""
    if not value or (key == "data.path" and value == "embedded"):
        return False
    return key not in HUB_KEYS or value.startswith((".", "/", "~")) or Path(value).expanduser().exists()


def _inside(value: str, roots: Sequence[str], urls: bool = True) -> bool:
    if "://" in value:
        return urls and any(_url_inside(value, root) for root in roots if "://" in root)
    path = Path(_resolve(value))
    return any("://" not in root and (path == Path(root) or Path(root) in path.parents) for root in roots)


def _url_inside(value: str, root: str) -> bool:
    """Object-store URLs have no symlinks: compare scheme, bucket and the normalised key prefix."""
    url, base = urlsplit(value), urlsplit(root)
    path, base_path = posixpath.normpath("/" + url.path), posixpath.normpath("/" + base.path)
    same_store = (url.scheme, url.netloc) == (base.scheme, base.netloc)
    return same_store and (path == base_path or path.startswith(base_path.rstrip("/") + "/"))


def _resolve(value: str) -> str:
    """An absolute path after `~`, `..` and symlinks (relative to the working directory); URLs as they are."""
    return value if "://" in value else os.path.realpath(Path(value).expanduser())


def _resolve_list(value: str) -> list[str]:
    return [_resolve(part) for part in value.split(os.pathsep) if part.strip()]


def _outside(what: str, value: str, roots: Sequence[str], variable: str) -> str:
    return f"{what} {value!r} is outside the allowed roots {', '.join(roots)} (set {variable} on the worker)"
