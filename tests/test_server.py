"""`sunlearn serve` and prefect.yaml against a real Prefect server, work pool and worker (SQLite, then PostgreSQL)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from pipeline.dag import ORDER, upstream_closure
from pipeline.serve import REPO, ProcessGroup, deployment_names, pool_name

SUNLEARN = [sys.executable, "-m", "pipeline.cli"]
STAGE_DEPLOYMENTS = ["prepare", "target", "assistants", "scores", "masks", "unlearn", "evaluate"]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def test_prefect_yaml_declares_the_deployments():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert set(by_name) == {"pipeline", *STAGE_DEPLOYMENTS, "sweep"}
    assert by_name["sweep"]["entrypoint"] == "pipeline.sweep:sweep_flow"
    assert {"grid", "preset", "overrides", "artifacts"} == set(by_name["sweep"]["parameters"])
    assert pool_name() == "sunlearn"
    pipeline = by_name["pipeline"]
    assert pipeline["entrypoint"] == "pipeline.flows:pipeline_flow"
    assert [s["active"] for s in pipeline["schedules"]] == [False] and pipeline["schedules"][0]["cron"]
    assert set(pipeline["parameters"]) == {"preset", "overrides", "artifacts"}
    for stage in STAGE_DEPLOYMENTS:
        d = by_name[stage]
        assert d["entrypoint"] == "pipeline.flows:stage_flow"
        assert d["parameters"]["stage"] == stage and d["parameters"]["force"] is True
        assert set(d["parameters"]) == {"stage", "preset", "overrides", "artifacts", "force"}
    # the pull step only changes directory: nothing is cloned
    assert [next(iter(step)) for step in spec["pull"]] == ["prefect.deployments.steps.set_working_directory"]
    assert all(d["work_pool"]["job_variables"]["working_dir"] for d in spec["deployments"])
    assert "sunlearn-stage/masks" in deployment_names()


def test_process_group_ends_descendants_in_other_sessions(tmp_path):
    # a child in a session of its own, as a Prefect worker starts each flow run, plus a SIGINT-ignoring parent
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True); "
              "time.sleep(600)")
    procs = ProcessGroup(tmp_path)
    procs.start("parent", [sys.executable, "-c", script], dict(os.environ))
    _wait(lambda: len(procs.pids()) == 2, 30, "the grandchild")
    pids = procs.pids()
    procs.stop(grace=3)
    assert not _alive(pids)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_deploys_and_reruns_one_stage_from_the_api(tmp_path):
    artifacts = tmp_path / "artifacts"
    with sunlearn_serve(tmp_path, artifacts) as (ui_url, api_url, database):
        assert database.startswith("sqlite")
        page = httpx.get(ui_url, timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()
        script = re.search(r'src="(/assets/[^"]+\.js)"', page.text).group(1)
        assert httpx.get(ui_url + script, timeout=30).status_code == 200
        assert httpx.get(f"{ui_url}/ui-settings", timeout=30).json()["api_url"] == api_url
        with prefect_client(api_url) as client:
            assert set(deployment_names()) <= _deployment_names(client)
            pipeline = client.read_deployment_by_name("sunlearn-pipeline/pipeline")
            assert pipeline.schedules and not any(s.active for s in pipeline.schedules)

            full = _run(client, "sunlearn-pipeline/pipeline", {"preset": "micro"}, timeout=480)
            keys = {a.key: a for a in _artifacts(client, full.id)}
            assert {f"{s}-summary" for s in ORDER} <= set(keys)
            assert keys["metrics"].type == "table" and json.loads(keys["metrics"].data)
            before = _manifests(artifacts)
            assert set(before) == set(ORDER) and all(len(v) == 1 for v in before.values())

            # what the UI's "Run > Custom run" does: create a flow run of the deployment with new parameters
            rerun = _run(client, "sunlearn-stage/masks", {"preset": "micro", "overrides": ["masks.gamma=0.3"]},
                         timeout=300)
            assert rerun.name == "stage-masks"
            summaries = {a.key: a for a in _artifacts(client, rerun.id)}
            after = _manifests(artifacts)

    new_masks = set(after["masks"]) - set(before["masks"])
    assert len(new_masks) == 1
    manifest = after["masks"][new_masks.pop()]
    assert manifest["config"]["masks"]["gamma"] == 0.3
    assert manifest["fingerprint"] in summaries["masks-summary"].data
    for stage in ORDER:
        if stage != "masks":  # upstream reused as is; downstream not asked for
            assert after[stage] == before[stage], stage


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_on_postgres_runs_a_deployment(tmp_path):
    installed = subprocess.run(["bash", str(REPO / ".ci" / "system-deps"), "postgresql"], capture_output=True,
                               text=True, timeout=600)
    if installed.returncode != 0:
        pytest.skip(f"postgresql cannot be installed here: {(installed.stderr or installed.stdout).strip()[-200:]}")
    # the server runs as the `postgres` user when we are root: its folder must be reachable, unlike pytest's tmp_path
    home = Path(tempfile.mkdtemp(prefix="sunlearn-pg-"))
    home.chmod(0o755)
    try:
        serving = sunlearn_serve(tmp_path, tmp_path / "artifacts", "--db", "postgres", "--home", str(home))
        with serving as (_, api, database):
            port = re.search(r"postgresql\+asyncpg://postgres@127\.0\.0\.1:(\d+)/prefect", database).group(1)
            with prefect_client(api) as client:
                run = _run(client, "sunlearn-stage/prepare", {"preset": "micro"}, timeout=300)
                assert "prepare-summary" in {a.key for a in _artifacts(client, run.id)}
            # the run is in PostgreSQL, and no SQLite database was created
            psql = ["psql", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-d", "prefect", "-tAc",
                    f"SELECT state_type FROM flow_run WHERE id = '{run.id}'"]
            assert subprocess.run(psql, capture_output=True, text=True, timeout=30).stdout.strip() == "COMPLETED"
            assert not list(home.glob("*.db"))
    finally:
        subprocess.run(["rm", "-rf", str(home)], timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_serve_with_auth_lets_only_the_string_in_and_confines_parameters(tmp_path):
    import websockets.sync.client

    artifacts = tmp_path / "artifacts"
    auth_file = tmp_path / "home" / "auth_string"
    with sunlearn_serve(tmp_path, artifacts, "--auth") as (ui_url, api_url, _):
        secret = auth_file.read_text().strip()
        assert auth_file.stat().st_mode & 0o777 == 0o600
        assert httpx.get(f"{api_url}/deployments", timeout=30).status_code == 401
        assert httpx.post(f"{api_url}/deployments/filter", json={}, timeout=30).status_code == 401
        assert httpx.post(f"{api_url}/deployments/filter", json={}, auth=("sunlearn", "wrong"),
                          timeout=30).status_code == 401
        user, _, password = secret.partition(":")
        assert httpx.post(f"{api_url}/deployments/filter", json={}, auth=(user, password),
                          timeout=30).status_code == 200
        assert httpx.get(f"{ui_url}/ui-settings", timeout=30).json()["auth"] == "BASIC"  # the UI asks for it
        # the events stream checks the string too (Prefect issue 17687, fixed before the pinned 3.9.1)
        events = api_url.replace("http://", "ws://") + "/events/out"
        for token, answer in ((None, None), ("wrong", None), (secret, "auth_success")):
            with websockets.sync.client.connect(events, subprotocols=["prefect"], open_timeout=30) as ws:
                ws.send(json.dumps({"type": "auth", "token": token}))
                try:
                    got = json.loads(ws.recv(timeout=30))["type"]
                except websockets.ConnectionClosed:
                    got = None
            assert got == answer, token

        with prefect_client(api_url, secret) as client:
            masks = client.read_deployment_by_name("sunlearn-stage/masks")
            assert secret not in json.dumps(masks.model_dump(mode="json"))  # never in a deployment
            escaped = tmp_path / "escaped"
            run = _final(client, "sunlearn-stage/masks", {"preset": "micro", "artifacts": f"{artifacts}/../escaped"},
                         timeout=300)
            assert run.state.type.value == "FAILED"
            message = run.state.message.strip()
            assert "\n" not in message and "parameter artifacts" in message
            assert f"allowed roots {artifacts.resolve()} " in message
            assert not escaped.exists() and not artifacts.exists()  # failed before any work

            done = _run(client, "sunlearn-stage/masks", {"preset": "micro"}, timeout=480)
            assert "masks-summary" in {a.key for a in _artifacts(client, done.id)}
            assert set(_manifests(artifacts)) == set(upstream_closure("masks"))

    printed = [tmp_path / "serve.out", *(tmp_path / "home" / "logs").glob("*.log")]
    assert len(printed) >= 4 and not [p for p in printed if secret in p.read_text(errors="replace")]
    assert f'PREFECT_API_AUTH_STRING="$(cat {auth_file})"' in (tmp_path / "serve.out").read_text()


@contextmanager
def sunlearn_serve(tmp_path: Path, artifacts: Path, *extra: str) -> Iterator[tuple[str, str, str]]:
    """`sunlearn serve` on a free loopback port; yields (UI URL, API URL, database); then checks that every process
    it started is gone."""
    out = tmp_path / "serve.out"
    home = ["--home", str(tmp_path / "home")] if "--home" not in extra else []
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(out, "wb") as fh:
        proc = subprocess.Popen([*SUNLEARN, "serve", "--port", "0", "--artifacts", str(artifacts), *home, *extra],
                                cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    seen: set[int] = set()
    try:
        def ready() -> re.Match | None:
            assert proc.poll() is None, f"sunlearn serve exited:\n{out.read_text()}"
            seen.update(_family(proc.pid))
            return re.search(r"Prefect UI:\s+(\S+)\s+API:\s+(\S+).*\s+database:\s+(.+)", out.read_text())

        _wait(ready, 300, "sunlearn serve")
        match = ready()
        yield match.group(1), match.group(2), match.group(3)
    finally:
        seen.update(_family(proc.pid))
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        leftover = _alive(seen)
        for pid in leftover:  # never leave a process behind, even when the test fails
            psutil.Process(pid).kill()
    assert not leftover, f"still running after serve stopped: {leftover}"
    assert proc.returncode == 0, out.read_text()
    assert "stopped" in out.read_text()
    assert len(seen) >= 3  # serve, server, worker (and postgres)


@contextmanager
def prefect_client(api_url: str, auth_string: str | None = None):
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url, auth_string=auth_string) as client:
        yield client


def _deployment_names(client) -> set[str]:
    """`flow/deployment` for every deployment the server lists, as the UI's deployments page shows them."""
    flows = {f.id: f.name for f in client.read_flows()}
    return {f"{flows[d.flow_id]}/{d.name}" for d in client.read_deployments()}


def _run(client, name: str, parameters: dict, timeout: float):
    run = _final(client, name, parameters, timeout)
    assert run.state.type.value == "COMPLETED", f"{name}: {run.state.type.value}: {run.state.message}"
    return run


def _final(client, name: str, parameters: dict, timeout: float):
    """A flow run of deployment `name` with `parameters`, once it reached a final state."""
    deployment = client.read_deployment_by_name(name)
    run = client.create_flow_run_from_deployment(deployment.id, parameters=parameters)
    _wait(lambda: client.read_flow_run(run.id).state.type.value in FINAL, timeout, f"flow run of {name}", every=2)
    return client.read_flow_run(run.id)


def _artifacts(client, flow_run_id) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    by_run = ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
    return client.read_artifacts(artifact_filter=by_run)


def _manifests(root: Path) -> dict[str, dict[str, dict]]:
    """{stage: {fingerprint: manifest}} for every complete cache entry."""
    out: dict[str, dict[str, dict]] = {}
    for path in sorted(root.glob("*/*/manifest.json")):
        out.setdefault(path.parent.parent.name, {})[path.parent.name] = json.loads(path.read_text())
    return out


def _family(pid: int) -> set[int]:
    try:
        parent = psutil.Process(pid)
        return {pid, *(c.pid for c in parent.children(recursive=True))}
    except psutil.NoSuchProcess:
        return set()


def _alive(pids: set[int]) -> set[int]:
    live = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                live.add(pid)
        except psutil.NoSuchProcess:
            pass
    return live


def _wait(check, timeout: float, what: str, every: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
