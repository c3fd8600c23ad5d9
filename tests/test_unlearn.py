"""The unlearning loop with a real DeepSpeed engine (CPU, gloo) on tiny models."""

from __future__ import annotations

import copy
import dataclasses
import math
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from schemas import DOCUMENTS, MASKS, REF_LOGPROBS, read_table, write_table
from stages.common import load_documents, load_tokenizer
from stages.config import UnlearnConfig
from stages.unlearn import METHODS, UnlearnDiverged, unlearn
from stages.unlearn.data import Split, attach_selection, collate, load_split
from stages.unlearn.distributed import init_distributed
from stages.unlearn.loop import Data, check_divergence, deepspeed_config, step_outputs, train_method
from stages.unlearn.methods import activation_mse
from stages.unlearn.reference import ModelReference, Reference, hidden_table, reference_table

VOCAB = 32
PAD = 0


def memorised_model(splits: list[Split], steps: int = 30) -> LlamaForCausalLM:
    """A tiny Llama fitted to the given sequences: a target that knows its forget set, as unlearning assumes."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = [collate(split, np.arange(len(split)), PAD) for split in splits]
    for _ in range(steps):
        for batch in batches:
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model


def random_split(rng: np.random.Generator, prefix: str, n: int, selective: bool = False) -> Split:
    ids = [rng.integers(1, VOCAB, size=int(rng.integers(7, 11))) for _ in range(n)]
    starts = np.full(n, 3)
    split = Split([f"{prefix}{i}" for i in range(n)], ids, starts)
    if selective:  # every other answer token
        split.selected = [(np.arange(len(x)) >= 3) & (np.arange(len(x)) % 2 == 0) for x in ids]
    return split


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple:
    """A saved tiny model and synthetic forget / retain / refusal data with its reference values."""
    init_distributed()
    path = tmp_path_factory.mktemp("tiny") / "model"
    rng = np.random.default_rng(0)
    forget, retain, idk = random_split(rng, "f", 4, True), random_split(rng, "r", 6), random_split(rng, "f", 4)
    model = memorised_model([forget, retain])
    model.save_pretrained(path)
    table = reference_table(model, {"forget": forget, "idk": idk, "retain": retain}, PAD, batch_size=3)
    hidden = hidden_table(model, retain, 0, PAD, batch_size=3)  # rmu's layer on a one-layer model
    table = pa.concat_tables([t.cast(REF_LOGPROBS) for t in (table, hidden)])
    return path, Data(forget, retain, idk, Reference(table), PAD)


def with_model_reference(data: Data, path) -> Data:
    """The same data with the frozen model kept in memory, as unlearn.reference=model gives (undial needs it)."""
    return dataclasses.replace(data, reference=ModelReference(AutoModelForCausalLM.from_pretrained(path)))


def forget_nll(model_path, split: Split) -> float:
    """Mean CE over forget answer tokens, through the Hugging Face loss (independent of methods.py)."""
    model = AutoModelForCausalLM.from_pretrained(model_path)
    batch = collate(split, np.arange(len(split)), PAD)
    with torch.no_grad():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels()).loss.item()


def test_one_engine_step_changes_the_weights(tiny):
    import deepspeed

    path, data = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(UnlearnConfig(), 1))
    outputs, _, _ = step_outputs(engine, METHODS["graddiff"], data, np.arange(2), np.arange(2))
    engine.backward(METHODS["graddiff"](outputs, 1.0))
    engine.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    engine.destroy()


def test_reference_matches_the_untouched_model(tiny):
    """At step 0 the model is the reference: NPO's ratio is 0 and the top-k KL is 0."""
    import deepspeed

    path, data = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(UnlearnConfig(), 1))
    for name in ("npo", "su_npo"):
        outputs, _, _ = step_outputs(engine, METHODS[name], data, np.arange(4), np.arange(4))
        assert METHODS["npo"](outputs, 1.0).item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-4)
    outputs, forget, _ = step_outputs(engine, METHODS["kl"], data, np.arange(4), np.arange(4))
    assert METHODS["kl"](outputs, 1.0).item() == pytest.approx(-forget.item(), abs=1e-4)
    engine.destroy()


def test_selective_variants_read_every_answer_token_of_the_batch(tiny):
    """normalize=answer rescales su's ascent by |selected| / |answer|; keep adds λ · the Hugging Face loss on the
    unselected answer tokens, counted here from the batch itself, independently of step_outputs."""
    import deepspeed

    path, data = tiny
    model = AutoModelForCausalLM.from_pretrained(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(UnlearnConfig(), 1))
    rows = np.arange(4)
    batch = collate(data.forget, rows, PAD)
    unselected = torch.where(batch.answer_mask & ~batch.selected, batch.input_ids, -100)
    with torch.no_grad():
        kept = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=unselected).loss.item()
    losses = {}
    for name, params in [("selected", {}), ("answer", {"normalize": "answer"}), ("keep", {"keep": 0.5})]:
        spec = METHODS["su"].with_params(params)
        outputs, _, retain = step_outputs(engine, spec, data, rows, rows)
        losses[name] = spec(outputs, 1.0).item() - retain.item()  # the retain NLL over all its answer tokens
    share = (batch.answer_mask & batch.selected).sum().item() / batch.answer_mask.sum().item()
    assert 0 < share < 1
    assert losses["answer"] == pytest.approx(losses["selected"] * share, rel=1e-4)
    assert losses["keep"] - losses["selected"] == pytest.approx(0.5 * kept, rel=1e-4)
    engine.destroy()


# SatImp's weight p^5 · (1 − p) is ~0.005 on a target that memorised its answers (p ≈ 0.995): at its γ = 0.1 the
# retain NLL outweighs its ascent 2000 to 1 and six steps barely move it (forget NLL 0.0052 -> 0.0062)
STRONGER = {"satimp": {"gamma": 1000.0}}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_raises_the_forget_nll(tiny, tmp_path, name):
    path, data = tiny
    data = with_model_reference(data, path) if METHODS[name].needs_reference_model else data
    # rmu trains a single matrix here (the down_proj of a one-layer model), so it gets a larger step
    u = UnlearnConfig(methods=[name], lr=3e-2 if METHODS[name].updates else 3e-3, epochs=3, batch_size=2)
    rows, stats = train_method(u, METHODS[name].with_params(STRONGER.get(name, {})), data, path, tmp_path)
    assert stats["steps"] == len(rows) == 6
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert forget_nll(tmp_path / name, data.forget) > 1.5 * forget_nll(path, data.forget)  # the target's is ~0.005


def test_cached_layer_output_is_the_frozen_models(tiny):
    """ref_logprobs.parquet keeps rmu's reference exactly: the frozen model's layer output at each answer position."""
    path, data = tiny
    batch = collate(data.retain, np.arange(len(data.retain)), PAD)
    cached = data.reference.hidden(batch, 0)
    live = ModelReference(AutoModelForCausalLM.from_pretrained(path)).hidden(batch, 0)
    assert cached.shape == (*batch.input_ids.shape, 32) and cached.abs().sum() > 0
    assert torch.equal(cached, live)
    with pytest.raises(ValueError, match=r"undial .* set unlearn.reference=model"):
        data.reference.logits(batch)


def test_rmu_trains_only_its_parameter_group(tiny, tmp_path):
    path, data = tiny
    u = UnlearnConfig(methods=["rmu"], lr=3e-3, epochs=1, batch_size=2)
    train_method(u, METHODS["rmu"], data, path, tmp_path)
    before, after = load_file(path / "model.safetensors"), load_file(tmp_path / "rmu" / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"model.layers.0.mlp.down_proj.weight"}


def test_rmu_moves_forget_activations_to_the_control_vector_and_keeps_retain(tiny):
    """Steps of the loop's own helpers: every step brings the forget activations nearer to c·u, while the retain
    ones stay at the frozen model's. Measured: the forget MSE to c·u falls from 2814 by about 60 in 20 steps (c = 300
    is far from activations of norm ~1), the retain MSE stays near 2e-3."""
    import deepspeed

    path, data = tiny
    spec = METHODS["rmu"]
    model = AutoModelForCausalLM.from_pretrained(path)
    names = spec.trainable([n for n, _ in model.named_parameters()], 1)
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(UnlearnConfig(), 1))
    state: dict = {}
    distances = []
    for _ in range(20):
        outputs, _, _ = step_outputs(engine, spec, data, np.arange(4), np.arange(4), state=state)
        loss = spec(outputs, 1.0)
        control = 300.0 * state["direction"]
        distances.append(activation_mse(outputs.forget_hidden, control, outputs.forget_mask).item())
        retain = activation_mse(outputs.retain_hidden, outputs.ref_retain_hidden, outputs.retain_mask).item()
        engine.backward(loss)
        engine.step()
    engine.destroy()
    moved = distances[0] - distances[-1]
    assert all(b < a for a, b in zip(distances, distances[1:], strict=False)) and moved > 20
    assert retain < 0.01 * moved


def test_zero3_gathers_the_full_model_before_saving(tiny, tmp_path):
    """ZeRO-3 shards every parameter; the saved model must still be whole and equal to the ZeRO-0 result."""
    path, data = tiny
    for stage in (0, 3):
        u = UnlearnConfig(lr=1e-3, epochs=1, batch_size=2, zero_stage=stage)
        train_method(u, METHODS["su_npo"], data, path, tmp_path / f"zero{stage}")
    a, b = (load_file(tmp_path / f"zero{stage}" / "su_npo" / "model.safetensors") for stage in (0, 3))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_divergence_guard_names_the_fix_and_writes_no_model(tiny, tmp_path):
    path, data = tiny
    u = UnlearnConfig(methods=["ga"], lr=3e-3, epochs=1, batch_size=2, max_forget_loss=1e-3)
    with pytest.raises(UnlearnDiverged, match=r"ga: .* step 1; lower unlearn.lr .* raise unlearn.max_forget_loss"):
        train_method(u, METHODS["ga"], data, path, tmp_path)
    assert not (tmp_path / "ga").exists()
    with pytest.raises(UnlearnDiverged, match=r"npo: loss became nan at step 7; lower unlearn.lr"):
        check_divergence("npo", 7, math.nan, 1.0, 1.0, u)


def write_masks(prepare_dir, masks_dir, every: int = 3) -> None:
    """A selection on every `every`-th answer token of each forget document."""
    forget = load_split(load_documents(prepare_dir), "forget")
    lengths = np.array([len(x) for x in forget.input_ids])
    doc = np.repeat(np.array(forget.doc_ids, dtype=object), lengths)
    position = np.concatenate([np.arange(n) for n in lengths])
    in_answer = position >= np.repeat(forget.answer_start, lengths)
    selected = in_answer & (position % every == 0)
    table = pa.table(
        {"doc_id": doc, "position": position, "selected": selected, "seed": selected, "in_answer": in_answer,
         "gold": pa.nulls(len(doc), pa.bool_())}
    )  # fmt: skip
    masks_dir.mkdir(parents=True, exist_ok=True)
    write_table(table.cast(MASKS), masks_dir / "masks.parquet")


@pytest.fixture(scope="module")
def micro_inputs(prepared_micro, trained_micro, tmp_path_factory) -> dict:
    masks = tmp_path_factory.mktemp("masks")
    write_masks(prepared_micro, masks)
    return {"prepare": prepared_micro, "target": trained_micro, "masks": masks}


def test_su_labels_are_ignored_exactly_where_not_selected(micro_inputs):
    forget = attach_selection(
        load_split(load_documents(micro_inputs["prepare"]), "forget"), micro_inputs["masks"] / "masks.parquet"
    )
    table = read_table(micro_inputs["masks"] / "masks.parquet")
    batch = collate(forget, np.arange(len(forget)), PAD)
    labels = batch.labels(selective=True)
    row = {d: i for i, d in enumerate(batch.doc_ids)}
    b = torch.tensor([row[d] for d in table["doc_id"].to_pylist()])
    t = torch.tensor(table["position"].to_numpy())
    selected = torch.tensor(table["selected"].to_numpy(zero_copy_only=False))
    assert len(table) == int(batch.attention_mask.sum())
    assert torch.equal(labels[b, t] == -100, ~selected)
    assert torch.equal(labels[b, t][selected], batch.input_ids[b, t][selected])
    assert int((labels != -100).sum()) == int(selected.sum())


def test_unlearn_on_micro_writes_models_and_log(micro_cfg, micro_inputs, tmp_path):
    cfg = copy.deepcopy(micro_cfg)
    cfg.unlearn.methods = ["su", "graddiff"]
    stats = unlearn(cfg, micro_inputs, tmp_path)
    log = read_table(tmp_path / "train_log.parquet").to_pandas()
    read_table(tmp_path / "ref_logprobs.parquet")
    for name in ("su", "graddiff"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert sum(p.numel() for p in model.parameters()) > 0
        assert stats[name]["steps"] == (log["model"] == name).sum() > 0
        assert math.isfinite(stats[name]["forget_loss"]) and stats[name]["peak_memory_mb"] > 0


def test_su_trains_on_the_mask_it_is_given(micro_cfg, micro_inputs, tmp_path):
    """With every answer token selected su's loss is graddiff's, so are its weights; with every third, they differ."""
    cfg = copy.deepcopy(micro_cfg)
    cfg.unlearn.methods = ["su", "graddiff"]
    every_token = tmp_path / "every_token"
    write_masks(micro_inputs["prepare"], every_token, every=1)
    weights = {}
    for name, masks in (("third", micro_inputs["masks"]), ("all", every_token)):
        unlearn(cfg, {**micro_inputs, "masks": masks}, tmp_path / name)
        weights[name] = {m: load_file(tmp_path / name / m / "model.safetensors") for m in cfg.unlearn.methods}

    def gap(a: dict, b: dict) -> float:
        return max((a[k] - b[k]).abs().max().item() for k in a)

    assert gap(weights["all"]["su"], weights["all"]["graddiff"]) < 1e-6
    assert gap(weights["third"]["su"], weights["third"]["graddiff"]) > 1e-4
    assert gap(weights["third"]["graddiff"], weights["all"]["graddiff"]) < 1e-6  # graddiff ignores the mask


def test_keeping_the_reference_model_trains_the_same_weights(micro_cfg, micro_inputs, tmp_path):
    """unlearn.reference=model computes on each batch what ref_logprobs.parquet holds: same losses, same weights."""
    cfg = copy.deepcopy(micro_cfg)
    cfg.unlearn.methods, cfg.unlearn.lr = ["npo_gd", "kl", "idkdpo", "rmu"], 1e-3
    runs = {}
    for mode in ("logprobs", "model"):
        cfg.unlearn.reference = mode
        stats = unlearn(cfg, micro_inputs, tmp_path / mode)
        runs[mode] = read_table(tmp_path / mode / "train_log.parquet").to_pandas(), stats
    assert len(read_table(tmp_path / "logprobs" / "ref_logprobs.parquet")) > 0
    assert len(read_table(tmp_path / "model" / "ref_logprobs.parquet")) == 0  # nothing precomputed
    np.testing.assert_allclose(runs["logprobs"][0]["loss"], runs["model"][0]["loss"], rtol=1e-5, atol=1e-5)
    target = load_file(micro_inputs["target"] / "target" / "model.safetensors")
    for name in cfg.unlearn.methods:
        assert runs["model"][1][name]["reference"] == "model"
        a, b = (load_file(tmp_path / mode / name / "model.safetensors") for mode in ("logprobs", "model"))
        assert max((a[k] - target[k]).abs().max().item() for k in a) > 1e-4  # it really trained
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.slow
def test_every_method_on_micro_gives_finite_metrics(micro_cfg, micro_inputs, tmp_path):
    """The unlearn and evaluate stages with every registered method (the frozen model kept, which undial needs)."""
    from stages.evaluate import evaluate

    cfg = copy.deepcopy(micro_cfg)
    cfg.unlearn.methods, cfg.unlearn.reference = sorted(METHODS), "model"
    stats = unlearn(cfg, micro_inputs, tmp_path / "unlearn")
    assert all(math.isfinite(stats[name]["forget_loss"]) for name in METHODS)
    evaluate(cfg, {**micro_inputs, "unlearn": tmp_path / "unlearn"}, tmp_path / "evaluate")
    rows = read_table(tmp_path / "evaluate" / "metrics.parquet").to_pylist()
    values = {(r["model"], r["metric"]): r["value"] for r in rows}
    for name in ["target", *sorted(METHODS)]:
        trained = f"forget NLL {stats[name]['forget_loss']:.3f}, " if name in stats else ""
        print(f"{name}: {trained}forget_prob {values[(name, 'forget_prob')]:.3f}, "
              f"model_utility {values[(name, 'model_utility')]:.3f}")
    assert {r["model"] for r in rows} >= set(METHODS)
    assert all(math.isfinite(r["value"]) for r in rows), [(r["model"], r["metric"]) for r in rows
                                                         if not math.isfinite(r["value"])]


def test_method_parameters_from_the_config_reach_the_loss(tiny, tmp_path):
    path, data = tiny
    u = UnlearnConfig(methods=["npo"], lr=1e-3, epochs=1, batch_size=2, params={"npo": {"beta": 2.0}})
    spec = METHODS["npo"].with_params(u.params["npo"])
    assert spec.params == {"beta": 2.0} and METHODS["npo"].params == {"beta": 0.1}  # the registry is untouched
    rows, stats = train_method(u, spec, data, path, tmp_path)
    assert stats["params"] == {"beta": 2.0}
    # at step 1 the model is the reference, so NPO's loss is (2/β)·log 2: it reads β = 2, not the default 0.1
    assert rows[0]["loss"] == pytest.approx(2 / 2.0 * math.log(2), rel=1e-4)


@pytest.fixture(scope="module")
def uniform_inputs(prepared_micro, tmp_path_factory) -> dict:
    """Artifacts whose documents all have the same length and answer start, so every process's shard of a batch
    holds the same number of answer tokens and the mean of per-process token means is the full batch's mean."""
    root = tmp_path_factory.mktemp("uniform")
    shutil.copytree(prepared_micro / "tokenizer", root / "prepare" / "tokenizer")
    vocab = len(load_tokenizer(prepared_micro))
    rng = np.random.default_rng(1)
    n = 16
    table = pa.table(
        {"doc_id": [f"d{i}" for i in range(n)], "split": ["forget"] * 8 + ["retain"] * 8,
         "question": ["q"] * n, "answer": ["a"] * n,
         "input_ids": [rng.integers(3, vocab, size=12).tolist() for _ in range(n)], "answer_start": [5] * n}
    )  # fmt: skip
    for field in DOCUMENTS:
        if field.name not in table.column_names:
            table = table.append_column(field.name, pa.nulls(n, field.type))
    write_table(table, root / "prepare" / "documents.parquet")
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=2)
    )  # fmt: skip
    model.save_pretrained(root / "target" / "target")
    write_masks(root / "prepare", root / "masks")
    return {"prepare": root / "prepare", "target": root / "target", "masks": root / "masks"}


@pytest.mark.slow
def test_two_processes_with_zero2_match_one(micro_cfg, uniform_inputs, tmp_path):
    """Same data, ZeRO-2: 2 CPU processes under torchrun end with the weights of 1 process.

    Each process's gradient is the mean over its half of the batch, and DeepSpeed averages them; with equal token
    counts per half that is the one-process gradient up to float32 summation order, and Adam's updates are about lr
    in size whatever the gradient's scale. Measured: weights differ by 1e-7 to 6e-7 after 4 steps of lr 1e-3; the
    1e-5 bound is 20x above that and 100x below one update.
    """
    cfg = copy.deepcopy(micro_cfg)
    cfg.unlearn.methods, cfg.unlearn.zero_stage, cfg.unlearn.lr = ["graddiff", "npo"], 2, 1e-3
    cfg.unlearn.batch_size, cfg.unlearn.epochs = 4, 2
    one, two = tmp_path / "one", tmp_path / "two"
    stats_one = unlearn(cfg, uniform_inputs, one)
    cfg.unlearn.num_procs = 2
    stats_two = unlearn(cfg, uniform_inputs, two)
    target = load_file(uniform_inputs["target"] / "target" / "model.safetensors")
    for name in ("graddiff", "npo"):
        assert stats_one[name]["steps"] == stats_two[name]["steps"] == 4
        a, b = load_file(one / name / "model.safetensors"), load_file(two / name / "model.safetensors")
        assert max((a[k] - target[k]).abs().max().item() for k in a) > 1e-3  # both really trained
        assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    log_one, log_two = (read_table(d / "train_log.parquet").to_pandas() for d in (one, two))
    np.testing.assert_allclose(log_one["loss"], log_two["loss"], atol=1e-5)


def test_a_failed_multi_node_launch_names_the_launcher(micro_cfg, micro_inputs, tmp_path):
    """With a hostfile the stage goes through DeepSpeed's real launcher; here its ssh check fails (no sshd on these
    addresses), and the error says which launcher failed, with no model written."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.2 slots=1\n127.0.0.3 slots=1\n")
    cfg = copy.deepcopy(micro_cfg)
    cfg.unlearn.hostfile = str(hostfile)
    with pytest.raises(RuntimeError, match=r"unlearn: DeepSpeed's launcher with .*hostfile exited with [1-9]"):
        unlearn(cfg, micro_inputs, tmp_path / "out")
    assert not any((tmp_path / "out").glob("*/model.safetensors"))


def test_methods_are_trained_once_per_their_own_settings(micro_cfg, micro_inputs, tmp_path):
    """Adding a method trains only it; another mask retrains only the methods that read one."""
    cache = tmp_path / "method_cache"
    cfg = copy.deepcopy(micro_cfg)
    cfg.unlearn.methods = ["su"]
    first = unlearn(cfg, micro_inputs, tmp_path / "first", method_cache=cache)
    cfg.unlearn.methods = ["su", "graddiff"]
    second = unlearn(cfg, micro_inputs, tmp_path / "second", method_cache=cache)
    assert not first["su"].get("reused") and second["su"]["reused"] and not second["graddiff"].get("reused")
    weights = {run: load_file(tmp_path / run / "su" / "model.safetensors") for run in ("first", "second")}
    assert all(torch.equal(weights["first"][k], weights["second"][k]) for k in weights["first"])
    log = read_table(tmp_path / "second" / "train_log.parquet").to_pandas()
    assert log["model"].drop_duplicates().tolist() == ["su", "graddiff"]

    other_mask = tmp_path / "every_token"
    write_masks(micro_inputs["prepare"], other_mask, every=1)
    third = unlearn(cfg, {**micro_inputs, "masks": other_mask}, tmp_path / "third", method_cache=cache)
    assert not third["su"].get("reused") and third["graddiff"]["reused"]  # graddiff reads no mask
