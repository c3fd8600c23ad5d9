"""Paths a flow run started through the server may name (pipeline/confinement.py), and `serve`'s own guards.

The end-to-end checks (a real authenticated server, a deployment run whose `artifacts` escapes) are in
tests/test_server.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.confinement import ParameterError, Roots, check_config_paths, check_parameters, load_confined
from pipeline.serve import REPO, ServeError, auth_string, is_loopback
from stages.config import load_config


@pytest.fixture
def roots(tmp_path) -> Roots:
    for name in ("artifacts", "configs", "data"):
        (tmp_path / name).mkdir()
    env = {"SUNLEARN_ARTIFACTS": str(tmp_path / "artifacts"), "SUNLEARN_CONFIG_ROOTS": str(tmp_path / "configs"),
           "SUNLEARN_DATA_ROOTS": str(tmp_path / "data")}
    return Roots.from_env(env)


def test_artifacts_inside_the_root_pass_and_dot_dot_fails(roots, tmp_path):
    check_parameters(str(tmp_path / "artifacts"), None, roots)
    check_parameters(str(tmp_path / "artifacts" / "team" / "a"), None, roots)
    check_parameters(str(tmp_path / "artifacts" / "x" / ".." / "y"), None, roots)
    with pytest.raises(ParameterError) as err:
        check_parameters(str(tmp_path / "artifacts" / ".." / "escaped"), None, roots)
    message = str(err.value)
    assert "\n" not in message and "parameter artifacts" in message
    assert f"allowed roots {tmp_path.resolve() / 'artifacts'} " in message
    for outside in ("/", str(tmp_path / "artifacts-evil"), "s3://bucket/artifacts"):
        with pytest.raises(ParameterError, match="parameter artifacts"):
            check_parameters(outside, None, roots)


def test_a_symlink_out_of_the_artifact_root_fails(roots, tmp_path):
    (tmp_path / "artifacts" / "link").symlink_to(tmp_path / "data")
    with pytest.raises(ParameterError, match="parameter artifacts"):
        check_parameters(str(tmp_path / "artifacts" / "link" / "stage"), None, roots)


def test_url_roots_compare_store_and_normalised_key():
    roots = Roots.from_env({"SUNLEARN_ARTIFACTS": "s3://team/sunlearn"})
    check_parameters("s3://team/sunlearn/sweep-1", None, roots)
    for outside in ("s3://team/sunlearn/../other", "s3://team/sunlearnx", "s3://other/sunlearn", "gs://team/sunlearn",
                    "/tmp/sunlearn"):
        with pytest.raises(ParameterError, match="parameter artifacts"):
            check_parameters(outside, None, roots)


def test_config_file_must_come_from_a_config_root(roots, tmp_path):
    (tmp_path / "configs" / "run.yaml").write_text("masks:\n  gamma: 0.4\n")
    check_parameters(str(tmp_path / "artifacts"), str(tmp_path / "configs" / "run.yaml"), roots)
    assert str(REPO / "configs") in roots.configs  # the checkout's folder is always allowed
    for outside in ("/etc/passwd", str(tmp_path / "configs" / ".." / "data" / "run.yaml")):
        with pytest.raises(ParameterError, match="parameter config_file"):
            check_parameters(str(tmp_path / "artifacts"), outside, roots)


def test_local_config_paths_must_sit_in_a_data_root(roots, tmp_path):
    (tmp_path / "data" / "tofu").mkdir()
    inside = load_config("micro", overrides=["data.source=tofu", f"data.path={tmp_path / 'data' / 'tofu'}"])
    check_config_paths(inside, roots)
    hub = load_config("micro", overrides=["data.source=tofu", "data.path=locuslab/TOFU", "model.name=org/model"])
    check_config_paths(hub, roots)
    saved = tmp_path / "artifacts" / "unlearn" / "fp" / "su"
    saved.mkdir(parents=True)
    check_config_paths(load_config("micro", overrides=[f"model.name={saved}"]), roots)  # artifacts are a data root
    for key, value in (("data.path", "/etc"), ("model.name", str(tmp_path)), ("model.retain_name", "/"),
                       ("evaluate.retain_logs", str(tmp_path / "data" / ".." / "configs")),
                       ("evaluate.retain_logs", "not/a/hub/id.json")):
        cfg = load_config("micro", overrides=["data.source=tofu", f"{key}={value}"])
        with pytest.raises(ParameterError) as err:
            check_config_paths(cfg, roots)
        assert f"config key {key}" in str(err.value) and str(tmp_path / "data") in str(err.value)


def test_outside_a_flow_run_the_cli_keeps_its_freedom(tmp_path):
    cfg = load_confined("micro", None, ["data.source=tofu", "data.path=/etc"], artifacts=str(tmp_path / ".." / "x"))
    assert cfg.data.path == "/etc"


def test_serve_refuses_an_open_host_without_auth(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    home = tmp_path / "home"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                           "--home", str(home)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "--host 0.0.0.0" in proc.stderr and "--auth" in proc.stderr
    assert not home.exists()  # refused before anything started


def test_auth_string_is_made_once_and_owner_only(tmp_path):
    path = tmp_path / "home" / "auth_string"
    first = auth_string(path)
    assert path.stat().st_mode & 0o777 == 0o600
    user, _, password = first.partition(":")
    assert user == "sunlearn" and len(password) >= 40
    assert auth_string(path) == first
    assert auth_string(tmp_path / "other" / "auth_string") != first
    os.chmod(path, 0o644)
    with pytest.raises(ServeError, match="chmod 600"):
        auth_string(path)
