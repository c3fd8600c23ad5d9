"""The files source and inputs in the fingerprint: a user's documents, forget requests appended between runs, input
files edited in place, and bad records refused with one line and an untouched cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data.forget_requests import write_example
from pipeline.cache import ArtifactCache, content_hashes
from pipeline.dag import ORDER, fingerprints
from pipeline.runner import materialize
from schemas import read_table
from stages.config import ConfigError, load_config
from stages.prepare import prepare

CLI = [sys.executable, "-m", "pipeline.cli"]


@pytest.fixture(autouse=True)
def own_hash_store(tmp_path, monkeypatch):
    monkeypatch.setenv("SUNLEARN_LOCAL_CACHE", str(tmp_path / "local-cache"))


def _example(folder: Path, documents: int = 12) -> Path:
    return write_example(folder, seed=1, documents=documents)


def _edit_in_place(path: Path, old: str, new: str) -> None:
    """Same size, new content, new mtime."""
    assert len(old) == len(new)
    text = path.read_text()
    assert old in text
    before = path.stat()
    path.write_text(text.replace(old, new, 1))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert path.stat().st_size == before.st_size


# --- reading: splits, bad records, unknown ids ------------------------------------------------------------------------

def test_documents_and_requests_become_splits(tmp_path):
    config = _example(tmp_path / "ex")
    cfg = load_config("micro", config)
    stats = prepare(cfg, {}, tmp_path / "out")
    requested = (tmp_path / "ex" / "forget.txt").read_text().split()
    assert stats["forget_ids"] == requested and len(requested) == 3
    docs = read_table(tmp_path / "out" / "documents.parquet").to_pylist()
    forget = {d["doc_id"].split("/")[1].rsplit("-", 1)[0] for d in docs if d["split"] == "forget"}
    retain = {d["doc_id"].split("/")[1].rsplit("-", 1)[0] for d in docs if d["split"] == "retain"}
    assert forget == set(requested) and not forget & retain and len(forget | retain) == 12
    by_split = {s: [d for d in docs if d["split"] == s] for s in {d["split"] for d in docs}}
    assert len(by_split["doc_verbmem"]) == 3 and len(by_split["doc_holdout"]) == 8
    assert all(d["question"] is not None for d in by_split["doc_utility"])
    verbmem = by_split["doc_verbmem"][0]
    source = json.loads(next(line for line in (tmp_path / "ex" / "corpus.jsonl").read_text().splitlines()
                             if verbmem["doc_id"].endswith(json.loads(line)["id"])))
    assert f"{verbmem['question']} {verbmem['answer']}" == source["text"]  # prompt + continuation: the document


def test_bad_records_are_one_line_with_counts(tmp_path):
    config = _example(tmp_path / "ex")
    corpus = tmp_path / "ex" / "corpus.jsonl"
    lines = corpus.read_text().splitlines()
    lines += ['{"text": "no id here"}', lines[0], '{"id": "blank", "text": "  "}', '{"id": "odd", "title": "x"}',
              '{"id": "late", "text": "fine"}', '{"id": "dup2", "text": "a"}', '{"id": "dup2", "text": "b"}']
    corpus.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        prepare(load_config("micro", config), {}, tmp_path / "out")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{corpus}: 5 bad records: ")
    assert f"1 without 'id' (first: {corpus}:13)" in message
    assert f"2 duplicate ids (first: 'doc-000' at {corpus}:1 and {corpus}:14)" in message
    assert f"1 empty 'text' (first: {corpus}:15)" in message
    assert f"1 without 'text' or 'question' + 'answer' (first: {corpus}:16)" in message
    assert not (tmp_path / "out" / "documents.parquet").exists()


def test_unknown_forget_id_names_it_and_valid_ids(tmp_path):
    config = _example(tmp_path / "ex")
    forget = tmp_path / "ex" / "forget.txt"
    forget.write_text(forget.read_text() + "# a comment\n\ndoc-999\nnope\n")
    with pytest.raises(ConfigError) as err:
        prepare(load_config("micro", config), {}, tmp_path / "out")
    assert str(err.value) == (f"data.forget_ids {forget} line 6: unknown id 'doc-999' (2 unknown ids in all); "
                              "valid ids include 'doc-000', 'doc-001', 'doc-002', 'doc-003', 'doc-004'")


def test_field_names_come_from_the_config(tmp_path):
    corpus = tmp_path / "qa.jsonl"
    rows = [{"key": f"k{i}", "q": f"What is item {i}?", "a": f"It is thing {i}."} for i in range(6)]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "forget.txt").write_text("k2\n")
    cfg = load_config("micro", overrides=["data.source=files", f"data.path={corpus}", "data.id_field=key",
                                          "data.question_field=q", "data.answer_field=a",
                                          f"data.forget_ids={tmp_path / 'forget.txt'}"])
    prepare(cfg, {}, tmp_path / "out")
    docs = read_table(tmp_path / "out" / "documents.parquet").to_pylist()
    assert [(d["doc_id"], d["question"]) for d in docs if d["split"] == "forget"] == [("forget/k2", "What is item 2?")]


# --- inputs in the fingerprint ----------------------------------------------------------------------------------------

def test_content_hash_is_reread_only_when_size_or_mtime_change(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("aaaa\n")
    first = content_hashes([path])[str(path)]
    st = path.stat()
    path.write_text("bbbb\n")  # same size; put the old mtime back: the cache must not read the file again
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert content_hashes([path])[str(path)] == first
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert content_hashes([path])[str(path)] != first


def test_every_input_file_and_the_forget_list_are_in_the_prepare_fingerprint(tmp_path):
    config = _example(tmp_path / "ex")
    cfg = load_config("micro", config)
    inputs = fingerprints(cfg)["prepare"]["inputs"]["files"]
    assert sorted(Path(p).name for p in inputs) == ["corpus.jsonl", "forget.txt", "holdout.jsonl", "utility.jsonl"]
    before = fingerprints(cfg)
    with open(tmp_path / "ex" / "utility.jsonl", "a") as fh:
        fh.write(json.dumps({"id": "qa-new", "question": "Q?", "answer": "A."}) + "\n")
    after = fingerprints(cfg)
    assert [s for s in ORDER if before[s]["fingerprint"] != after[s]["fingerprint"]] == ORDER


def test_with_a_pretrained_target_a_new_request_keeps_the_target_stage(tmp_path):
    config = _example(tmp_path / "ex")
    model = tmp_path / "model"
    model.mkdir()
    forget = tmp_path / "ex" / "forget.txt"
    # a pretrained target is copied as is; fine-tuned (target.finetune) or trained here, it reads the documents
    for overrides, keeps_target in (([f"model.name={model}"], True), ([f"model.name={model}", "target.finetune=true"],
                                                                       False), ([], False)):
        cfg = load_config("micro", config, overrides)
        before = fingerprints(cfg)
        forget.write_text(forget.read_text() + f"doc-{len(forget.read_text().split()) + 5:03d}\n")
        after = fingerprints(cfg)
        changed = [s for s in ORDER if before[s]["fingerprint"] != after[s]["fingerprint"]]
        assert changed == ([s for s in ORDER if s != "target"] if keeps_target else ORDER)


def test_tofu_folder_edited_in_place_recomputes_prepare(tmp_path, tofu_folder):
    folder = tofu_folder(tmp_path / "tofu", [{"question": "Q1?", "answer": "Alpha."}])
    cfg = load_config("micro", overrides=["data.source=tofu", f"data.path={folder}", "model.vocab_size=300"])
    root = tmp_path / "artifacts"
    first = materialize("prepare", cfg, root)
    assert materialize("prepare", cfg, root).status == "cached"
    _edit_in_place(folder / "forget10.json", "Alpha.", "Omega.")
    second = materialize("prepare", cfg, root)
    assert second.status == "ran" and second.fingerprint != first.fingerprint
    docs = read_table(Path(second.path) / "documents.parquet").to_pylist()
    assert [d["answer"] for d in docs if d["split"] == "forget"] == ["Omega."]


# --- the pipeline on a schedule: requests appended between runs -------------------------------------------------------

def _ran(summary):
    return [s["name"] for s in summary["stages"] if s["status"] == "ran"]


def _weights(summary, method: str) -> dict[str, str]:
    unlearn = next(s for s in summary["stages"] if s["name"] == "unlearn")
    files = ArtifactCache(Path(unlearn["path"]).parents[1]).entry("unlearn", unlearn["fingerprint"]).manifest()
    return {k: v for k, v in files["files"].items() if k.startswith(f"{method}/") and k.endswith(".safetensors")}


@pytest.mark.slow
def test_forget_requests_between_scheduled_runs(tmp_path, prefect_harness):
    from pipeline.flows import pipeline_flow

    config = _example(tmp_path / "ex")
    root = str(tmp_path / "artifacts")
    run = {"preset": "micro", "config_file": str(config), "artifacts": root, "overrides": ["unlearn.methods=su"]}
    first = pipeline_flow(**run)
    assert _ran(first) == ORDER and first["changes"]["previous_run"] is None
    metrics = {m["metric"] for m in first["metrics"]}
    assert {"forget_nll", "retain_nll", "doc_verbmem_f", "doc_privleak", "utility_rouge", "utility_prob",
            "utility_fact_recall"} <= metrics
    assert not metrics & {"forget_quality", "forget_truth_ratio", "verbmem_f"}  # no TOFU or MUSE metric

    second = pipeline_flow(**run)
    assert _ran(second) == [] and second["changes"]["recomputed"] == []
    assert second["changes"]["requests_added"] == []

    forget = tmp_path / "ex" / "forget.txt"
    new_id = next(f"doc-{i:03d}" for i in range(12) if f"doc-{i:03d}" not in forget.read_text().split())
    forget.write_text(forget.read_text() + new_id + "\n")
    third = pipeline_flow(**run)
    assert _ran(third) == ORDER  # the tokenizer and target are trained here, so everything reads the new split
    assert third["changes"]["requests_added"] == [new_id]
    assert third["changes"]["inputs_changed"] == [str(forget.resolve())]
    assert _weights(third, "su") and _weights(third, "su") != _weights(second, "su")
    forget_docs = read_table(Path(third["stages"][0]["path"]) / "documents.parquet").to_pylist()
    assert any(d["doc_id"].startswith(f"forget/{new_id}-") for d in forget_docs if d["split"] == "forget")

    corpus = tmp_path / "ex" / "corpus.jsonl"
    _edit_in_place(corpus, "Monday", "Friday")
    fourth = pipeline_flow(**run)
    assert "prepare" in _ran(fourth)
    assert fourth["changes"]["inputs_changed"] == [str(corpus.resolve())]
    assert fourth["changes"]["requests_added"] == []


@pytest.fixture
def server_env(prefect_harness) -> dict[str, str]:
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    files = (p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")) if root.exists() else ()
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["bad_record", "unknown_id"])
def test_bad_input_is_one_line_and_leaves_the_cache(fault, tmp_path, server_env):
    config = _example(tmp_path / "ex")
    root = tmp_path / "artifacts"
    args = ["--preset", "micro", "--config", str(config), "--artifacts", str(root)]
    ok = subprocess.run([*CLI, "stage", "prepare", *args], capture_output=True, text=True, env=server_env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-3000:]
    before = _snapshot(root)
    if fault == "bad_record":
        with open(tmp_path / "ex" / "corpus.jsonl", "a") as fh:
            fh.write('{"id": "doc-000", "text": "again"}\n')
        message = "1 bad record: 1 duplicate ids (first: 'doc-000' at"
    else:
        with open(tmp_path / "ex" / "forget.txt", "a") as fh:
            fh.write("doc-404\n")
        message = "unknown id 'doc-404'; valid ids include 'doc-000'"
    proc = subprocess.run([*CLI, "run", *args], capture_output=True, text=True, env=server_env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [line for line in lines if "sunlearn: error" in line] == lines[-1:] and message in lines[-1]
    assert _snapshot(root) == before
