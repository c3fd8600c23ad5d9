"""Two real `sunlearn run` processes on one artifact root: each artifact is computed once, the other run reuses it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.cache import ArtifactCache
from pipeline.dag import ORDER

pytestmark = pytest.mark.slow


def test_two_runs_at_once_compute_each_artifact_once(tmp_path):
    root = tmp_path / "artifacts"
    # each process starts its own temporary Prefect server, as two users' `sunlearn run` would
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--preset", "micro", "--json", "--set",
           "evaluate.max_new_tokens=4", "--artifacts", str(root)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    summaries = [{s["name"]: s for s in json.loads(stdout)["stages"]} for stdout, _ in outputs]

    cache = ArtifactCache(root)
    for stage in ORDER:
        # one complete folder per stage, the same one in both summaries
        folders = [p for p in (root / stage).iterdir() if not p.name.startswith(".")]
        assert len(folders) == 1 and all(s[stage]["path"] == str(folders[0]) for s in summaries)
        assert sorted(s[stage]["status"] for s in summaries) == ["cached", "ran"], stage
        assert not list((root / stage).glob(".tmp-*"))
    assert all(entry.verify(full=True) == [] for entry in cache.entries(ORDER))


def test_a_worker_builds_a_free_stage_while_another_holds_the_next_one(tmp_path):
    """materialize_all skips a stage another process is building (its lock is held) for one that is ready and free,
    and comes back to it once the lock is released."""
    import threading

    from pipeline.dag import fingerprints
    from pipeline.runner import materialize_all
    from stages.config import load_config

    root = tmp_path / "artifacts"
    cfg = load_config("micro", overrides=["evaluate.max_new_tokens=4"])
    fps = fingerprints(cfg)
    cache = ArtifactCache(root)
    target, masks = (cache.entry(s, fps[s]["fingerprint"]) for s in ("target", "masks"))
    held, release = threading.Event(), threading.Event()

    def other_builder():  # holds target's lock until masks, which needs no target, is complete
        with cache.lock(target):
            held.set()
            release.wait(timeout=60)

    holder = threading.Thread(target=other_builder)
    holder.start()
    held.wait(timeout=30)
    assert cache.busy(target) and not cache.busy(masks)
    watcher = threading.Thread(target=lambda: (_wait_for(masks.is_complete), release.set()))
    watcher.start()
    results = materialize_all(cfg, root)
    holder.join()
    watcher.join()
    order = [r.name for r in results]
    assert order.index("masks") < order.index("target"), order
    assert sorted(order) == sorted(ORDER) and all(r.status == "ran" for r in results)
    assert not cache.busy(target)


def test_a_worker_whose_next_stage_is_taken_builds_a_later_points_shared_stages(tmp_path):
    """While another process holds this point's target, materialize_all builds the assistants, scores and masks of a
    later point that differs in them, then its own remaining stages once the target is free."""
    import threading

    from pipeline.dag import fingerprints
    from pipeline.runner import materialize_all
    from stages.config import load_config

    root = tmp_path / "artifacts"
    cfg = load_config("micro", overrides=["evaluate.max_new_tokens=4"])
    later = load_config("micro", overrides=["evaluate.max_new_tokens=4", "assistants.splits=full_forget",
                                            "masks.gamma=0.9"])
    cache = ArtifactCache(root)
    fps, later_fps = fingerprints(cfg), fingerprints(later)
    target = cache.entry("target", fps["target"]["fingerprint"])
    theirs = [cache.entry(s, later_fps[s]["fingerprint"]) for s in ("assistants", "scores", "masks")]
    assert target.fingerprint == later_fps["target"]["fingerprint"]
    assert all(e.fingerprint != fps[e.stage]["fingerprint"] for e in theirs)
    held, release, built_while_held = threading.Event(), threading.Event(), []

    def other_builder():  # holds the target until the later point's masks are complete (or a minute has passed)
        with cache.lock(target):
            held.set()
            release.wait(timeout=60)

    def watcher():
        _wait_for(theirs[-1].is_complete)
        built_while_held.append(all(e.is_complete() for e in theirs))
        release.set()

    holder = threading.Thread(target=other_builder)
    holder.start()
    held.wait(timeout=30)
    watching = threading.Thread(target=watcher)
    watching.start()
    results = materialize_all(cfg, root, [later])
    holder.join()
    watching.join()
    assert built_while_held == [True]
    assert all(r.fingerprint == fps[r.name]["fingerprint"] for r in results)  # the later point's are not its own
    assert sorted(r.name for r in results) == sorted(ORDER) and all(r.status == "ran" for r in results)


def test_a_process_takes_first_the_ready_stage_whose_libraries_it_has_loaded():
    """Of two ready stages, a process that has not imported transformers takes the assistants and leaves the target
    to one that loaded it while it waited; with one ready stage, or all loaded, the DAG's order stands."""
    from pipeline.dag import LLAMA
    from pipeline.runner import next_stage

    assert next_stage(["target", "assistants"], loaded=set()) == "assistants"
    assert next_stage(["target", "assistants"], loaded={LLAMA}) == "target"
    assert next_stage(["target"], loaded=set()) == "target"


def test_a_waiting_process_claims_the_stage_whose_libraries_it_has_not_loaded():
    """With prepare being built elsewhere and transformers not loaded, the target is claimed; not once its libraries
    are loaded, nor when another process holds it, nor before anyone builds its upstream."""
    from pipeline.dag import LLAMA
    from pipeline.runner import claimable

    building = {"prepare"}
    assert claimable(ORDER, set(), lambda up: up in building, lambda name: name in building) == "target"
    assert claimable(ORDER, {LLAMA, "deepspeed"}, lambda up: up in building, lambda name: name in building) is None
    assert claimable(ORDER, set(), lambda up: up in building | {"target"},
                     lambda name: name in building | {"target"}) is None  # unlearn also waits on masks
    assert claimable(ORDER, set(), lambda up: False, lambda name: False) is None


def test_a_fresh_process_claims_the_target_while_another_builds_prepare_and_builds_it(tmp_path):
    """A real second process (no transformers loaded) finds prepare held here: it takes the target's lock before
    prepare is done, builds the target once it is, and its point completes."""
    import os

    from pipeline.dag import fingerprints
    from pipeline.runner import materialize
    from stages.config import load_config

    root = tmp_path / "artifacts"
    overrides = ["evaluate.max_new_tokens=4"]
    cfg = load_config("micro", overrides=overrides)
    fps = fingerprints(cfg)
    cache = ArtifactCache(root)
    prepare, target = (cache.entry(s, fps[s]["fingerprint"]) for s in ("prepare", "target"))
    code = ("import sys; from pipeline.runner import materialize_all; from stages.config import load_config; "
            "from stages.environment import configure_environment; configure_environment(); "
            f"r = materialize_all(load_config('micro', overrides={overrides!r}), sys.argv[1]); "
            "print(','.join(f'{x.name}:{x.status}' for x in r))")
    claimed_before_prepare = []
    with cache.lock(prepare):
        proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        _wait_for(lambda: cache.busy(target) or proc.poll() is not None, timeout=120)
        claimed_before_prepare.append(cache.busy(target))
        materialize("prepare", cfg, root)  # this process's build, under the lock it holds
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert claimed_before_prepare == [True], stderr[-3000:]
    statuses = dict(item.split(":") for item in stdout.strip().splitlines()[-1].split(","))
    assert statuses["prepare"] == "cached" and statuses["target"] == "ran"
    assert sorted(statuses) == sorted(ORDER)


def _wait_for(condition, timeout: float = 60) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.2)


def test_the_reference_evaluations_are_split_and_the_evaluate_stage_reuses_them(tmp_path):
    """A process that finds one reference result claimed by another (its lock held) computes the others first, each
    once, under the key the evaluate stage reads: the stage then evaluates no reference model itself."""
    import threading

    from pipeline.cache import exclusive_lock
    from pipeline.references import evaluate_references, reference_jobs
    from pipeline.runner import materialize_all, materialize_until
    from stages.config import load_config

    root = tmp_path / "artifacts"
    cfg = load_config("micro", overrides=["evaluate.max_new_tokens=4"])
    materialize_until("target", cfg, root)
    jobs, _ = reference_jobs(cfg, root)
    assert {j.ref.name for j in jobs} == {"target", "retain"} and len(jobs) > 2
    held, release = threading.Event(), threading.Event()

    def other_process():  # claims the first job and holds it until every other job is done
        jobs[0].lock.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(jobs[0].lock):
            held.set()
            release.wait(timeout=120)

    holder = threading.Thread(target=other_process)
    holder.start()
    held.wait(timeout=30)
    computed: list[int] = []
    worker = threading.Thread(target=lambda: computed.append(evaluate_references(cfg, root)))
    worker.start()
    try:
        _wait_for(lambda: all(j.result.is_file() for j in jobs[1:]))
        assert all(j.result.is_file() for j in jobs[1:]) and not jobs[0].result.is_file()  # the claimed one was left
    finally:
        release.set()
        holder.join()
        worker.join()
    assert computed == [len(jobs)]  # the holder computed nothing, so this process took the claimed one after all

    results = {r.name: r for r in materialize_all(cfg, root)}
    assert results["evaluate"].status == "ran" and results["evaluate"].stats["cache_hits"] == len(jobs)
