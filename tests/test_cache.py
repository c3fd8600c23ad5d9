"""The artifact cache: atomic publication, manifests with checksums, stale temp folders on a root shared by nodes."""

import json
import os
import threading
import time

import pytest

from pipeline.cache import HEARTBEAT, MANIFEST, ArtifactCache, temp_dir, temp_owner


def test_build_publishes_files_with_manifest_last(tmp_path):
    cache = ArtifactCache(tmp_path)
    entry = cache.entry("masks", "abc")

    def produce(tmp):
        (tmp / "x.txt").write_text("hello")
        assert not entry.path.exists()  # nothing visible while the stage runs
        return {"n": 1}

    manifest = cache.build(entry, produce, {"config": {}})
    assert entry.is_complete()
    assert json.loads((entry.path / MANIFEST).read_text())["stats"] == {"n": 1}
    assert set(manifest["files"]) == {"x.txt"}
    assert entry.verify() == []
    (entry.path / "x.txt").write_text("tampered")
    assert "checksum mismatch" in entry.verify()[0]


def test_failed_stage_leaves_nothing(tmp_path):
    cache = ArtifactCache(tmp_path)
    entry = cache.entry("masks", "abc")

    def produce(tmp):
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.build(entry, produce, {})
    assert not entry.path.exists()
    assert list((tmp_path / "masks").iterdir()) == []


def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path):
    cache = ArtifactCache(tmp_path, host="node-a")
    stale = tmp_path / "masks" / ".tmp-abc-node-a-999999999-ffffff"
    stale.mkdir(parents=True)
    live = tmp_path / "masks" / f".tmp-abc-node-a-{os.getpid()}-eeeeee"
    live.mkdir()
    cache.build(cache.entry("masks", "abc"), lambda tmp: None, {})
    assert not stale.exists()
    assert live.exists()


def test_temp_folder_names_carry_host_and_pid(tmp_path):
    tmp = temp_dir(tmp_path, "0123abcd", host="gpu-node-07.cluster")
    assert tmp.name.startswith(".tmp-0123abcd-gpu-node-07.cluster-")
    assert temp_owner(tmp) == ("gpu-node-07.cluster", os.getpid())
    assert temp_owner(tmp_path / ".tmp-abc-999-ffffff") is None  # the old layout names no host


def test_another_hosts_build_is_kept_until_its_heartbeat_is_older_than_the_lease(tmp_path):
    """On shared storage a pid from node-b means nothing on node-a: only the heartbeat tells node-b's build is dead."""
    node_a = ArtifactCache(tmp_path, host="node-a", lease_seconds=60)
    stage_dir = tmp_path / "masks"
    dead_pid_here = 999999999  # no such process on this machine; node-b's build may still be running
    fresh = stage_dir / f".tmp-abc-node-b-{dead_pid_here}-aaaaaa"
    expired = stage_dir / f".tmp-def-node-b-{dead_pid_here}-bbbbbb"
    for folder in (fresh, expired):
        folder.mkdir(parents=True)
        (folder / HEARTBEAT).touch()
    old = time.time() - 120
    os.utime(expired / HEARTBEAT, (old, old))
    node_a.clean_stale(stage_dir)
    assert fresh.exists()
    assert not expired.exists()


def test_a_running_build_refreshes_its_heartbeat_and_survives_another_nodes_clean(tmp_path):
    node_b = ArtifactCache(tmp_path, host="node-b", heartbeat_seconds=0.05, lease_seconds=60)
    node_a = ArtifactCache(tmp_path, host="node-a", lease_seconds=60)
    entry = node_b.entry("masks", "abc")
    started, release = threading.Event(), threading.Event()
    seen: dict[str, object] = {}

    def produce(tmp):
        beat = tmp / HEARTBEAT
        first = beat.stat().st_mtime_ns
        old = time.time() - 3600  # as if the last beat were an hour ago: only a refresh brings it back
        os.utime(beat, (old, old))
        started.set()
        deadline = time.monotonic() + 30
        while beat.stat().st_mtime_ns <= first and time.monotonic() < deadline:
            time.sleep(0.01)
        seen["refreshed"] = beat.stat().st_mtime_ns > first
        release.wait(30)
        (tmp / "x.txt").write_text("done")

    builder = threading.Thread(target=lambda: seen.update(manifest=node_b.build(entry, produce, {})))
    builder.start()
    assert started.wait(30)
    while "refreshed" not in seen:
        time.sleep(0.01)
    node_a.clean_stale(tmp_path / "masks")  # node-a cannot see node-b's pid; the fresh heartbeat keeps the build
    assert list((tmp_path / "masks").glob(".tmp-abc-node-b-*"))
    release.set()
    builder.join(30)
    assert seen["refreshed"] and entry.is_complete()
    assert set(seen["manifest"]["files"]) == {"x.txt"} and not (entry.path / HEARTBEAT).exists()


def test_quick_verify_catches_changed_files_and_verify_all_fixes(tmp_path):
    cache = ArtifactCache(tmp_path)
    entry = cache.entry("scores", "f00")
    cache.build(entry, lambda tmp: (tmp / "token_scores.parquet").write_bytes(b"x" * 100), {})
    assert entry.verify(full=False) == []
    target = entry.path / "token_scores.parquet"
    target.write_bytes(b"y" * 100)  # same size, new mtime: the quick check re-hashes it
    assert "checksum mismatch" in entry.verify(full=False)[0]
    incomplete = tmp_path / "scores" / "0ddba11"
    incomplete.mkdir()
    report = cache.verify_all(["scores"], fix=True)
    assert {r["fingerprint"]: r["removed"] for r in report} == {"0ddba11": True, "f00": True}
    assert not entry.path.exists() and not incomplete.exists()


def test_busy_tells_whether_another_holder_has_the_entrys_lock(tmp_path):
    cache = ArtifactCache(tmp_path)
    entry = cache.entry("masks", "abc")
    assert not cache.busy(entry)  # never locked: no lock file
    with cache.lock(entry):
        assert cache.busy(entry)  # a second descriptor cannot take an flock this one holds
    assert not cache.busy(entry)


def test_a_thread_that_holds_a_lock_takes_it_again_and_others_wait_until_the_outermost_release(tmp_path):
    """exclusive_lock nests in the thread that holds it (a process that claimed a stage builds it under the same
    lock); any other thread finds it busy until the outermost release."""
    cache = ArtifactCache(tmp_path)
    entry = cache.entry("target", "abc")
    seen = []

    def holder():
        with cache.lock(entry):
            with cache.lock(entry):  # without nesting: blocks for good on its own flock
                seen.append("nested")
            probe = threading.Thread(target=lambda: seen.append(cache.busy(entry)))
            probe.start()
            probe.join()

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert seen == ["nested", True]
    assert not cache.busy(entry)


def test_a_stage_runs_with_the_heap_frozen_and_garbage_from_before_collected(tmp_path):
    """materialize collects, then freezes what is alive, before a stage runs: the stages' gc.collect() after each
    model then walks only what the stage made; garbage made before the stage is collected, not frozen for good."""
    import gc
    import weakref

    from pipeline.runner import materialize
    from stages.config import load_config

    class Node:
        pass

    cycle = Node()
    cycle.self = cycle
    dead = weakref.ref(cycle)
    del cycle
    gc.unfreeze()
    try:
        materialize("prepare", load_config("micro"), tmp_path / "artifacts")
        assert gc.get_freeze_count() > 0
        assert dead() is None
    finally:
        gc.unfreeze()


def test_the_heap_is_not_frozen_while_another_stage_of_the_process_runs(tmp_path):
    """A stage that starts while another runs in this process (the flow's target beside its assistants, in threads)
    freezes nothing: the other stage's objects would never be collected once it drops them."""
    import gc

    from pipeline.runner import STAGE_HEAP, materialize
    from stages.config import load_config

    gc.unfreeze()
    try:
        with STAGE_HEAP.stage():  # the other stage, in flight
            gc.unfreeze()
            materialize("prepare", load_config("micro"), tmp_path / "artifacts")
            assert gc.get_freeze_count() == 0
        assert STAGE_HEAP.running == 0
    finally:
        gc.unfreeze()
