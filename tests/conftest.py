"""Shared fixtures: the micro config, and the prepare and target stages run on it once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.env import configure_environment

configure_environment()  # DS_ACCELERATOR, extension cache, Prefect settings: as the CLI sets them

from pipeline.config import Config, load_config  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for every test that runs a real flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def micro_cfg() -> Config:
    return load_config("micro")


@pytest.fixture(scope="session")
def prepared_micro(micro_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.prepare import prepare

    out = tmp_path_factory.mktemp("prepare")
    prepare(micro_cfg, {}, out)
    return out


@pytest.fixture(scope="session")
def trained_micro(micro_cfg: Config, prepared_micro: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.target import train_target

    out = tmp_path_factory.mktemp("target")
    train_target(micro_cfg, {"prepare": prepared_micro}, out)
    return out
