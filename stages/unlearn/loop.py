"""The one loop every method shares: a DeepSpeed engine per method, forget batches each paired with a retain batch,
a divergence guard, and one train_log row per optimizer step. A method only supplies its loss (methods.py).

Given a `scratch` folder (the cache's resume state, kept across a killed run) the loop saves a DeepSpeed checkpoint
every unlearn.checkpoint_every steps and resumes from the newest one; a method that finished is reused whole.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import torch

from schemas import REF_LOGPROBS, TRAIN_LOG, read_table, write_json_atomic, write_table
from stages.common import load_documents, load_model, load_tokenizer, log, seed_everything
from stages.config import Config, UnlearnConfig
from stages.progress import Progress
from stages.scoring import score_sequences
from stages.unlearn.data import Split, attach_selection, collate, idk_split, load_split, schedule
from stages.unlearn.distributed import init_distributed, launch
from stages.unlearn.lora import merged, trainable, with_lora
from stages.unlearn.method_cache import method_key, restore, store
from stages.unlearn.methods import METHODS, MethodSpec, Outputs, nll, token_logprobs
from stages.unlearn.reference import ModelReference, Reference, hidden_table, layer_output, reference_table

TARGET_DIR = "target"  # inside the target stage's folder


class UnlearnDiverged(RuntimeError):
    """A method's loss became non-finite or its forget NLL passed unlearn.max_forget_loss."""


@dataclass
class Data:
    forget: Split
    retain: Split
    idk: Split | None
    reference: Reference | ModelReference | None
    pad_id: int


def unlearn(cfg: Config, inputs: dict[str, Path], out: Path, scratch: Path | None = None,
            method_cache: Path | None = None) -> dict[str, Any]:
    """Unlearn with every method of cfg.unlearn.methods; writes out/<method>/, train_log and ref_logprobs.

    `scratch` holds checkpoints and finished methods of an earlier, killed run of the same config; `method_cache`
    holds methods trained by earlier runs (stages.unlearn.method_cache), which are linked in, not trained again.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = {name: METHODS[name].with_params(cfg.unlearn.params.get(name, {})) for name in cfg.unlearn.methods}
    entries = {name: method_cache / method_key(cfg, spec, inputs, TARGET_DIR) for name, spec in specs.items()} \
        if method_cache is not None else {}
    cached = {name: result for name, entry in entries.items() if (result := restore(entry, out, name)) is not None}
    todo = [name for name in cfg.unlearn.methods if name not in cached]
    stats: dict[str, Any] = {}
    rows: dict[str, list[dict]] = {name: result["rows"] for name, result in cached.items()}
    if todo:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.unlearn.methods = todo
        if cfg.unlearn.hostfile or cfg.unlearn.num_procs > 1:
            stats = launch(run_cfg.to_dict(), inputs, out, cfg.unlearn.num_procs, cfg.unlearn.hostfile)
        else:
            stats = unlearn_in_process(run_cfg, inputs, out, scratch)
        for row in read_table(out / "train_log.parquet").to_pylist():
            rows.setdefault(row["model"], []).append(row)
        for name in todo:
            if name in entries:
                store(entries[name], out, name, rows.get(name, []), stats[name])
    else:  # every method came from the cache: nothing read reference values
        write_table(pa.Table.from_pylist([], schema=REF_LOGPROBS), out / "ref_logprobs.parquet")
    for name, result in cached.items():
        log.info("unlearn %s: reusing the model an earlier run trained with the same settings", name)
        stats[name] = {**result["stats"], "reused": True}
    ordered = [row for name in cfg.unlearn.methods for row in rows.get(name, [])]
    write_table(pa.Table.from_pylist(ordered, schema=TRAIN_LOG), out / "train_log.parquet")
    return {name: stats[name] for name in cfg.unlearn.methods}


def unlearn_in_process(cfg: Config, inputs: dict[str, Path], out: Path, scratch: Path | None = None) -> dict[str, Any]:
    """The unlearn loop in this process: a world of one, or one rank of a launched job (stages.unlearn.worker)."""
    rank, _ = init_distributed()
    specs = [METHODS[name].with_params(cfg.unlearn.params.get(name, {})) for name in cfg.unlearn.methods]
    data = load_data(cfg, inputs, specs, out, rank)
    rows: list[dict] = []
    stats: dict[str, Any] = {}
    for spec in specs:
        target = Path(inputs["target"]) / TARGET_DIR
        method_rows, stats[spec.name] = train_method(cfg.unlearn, spec, data, target, out, scratch)
        rows.extend(method_rows)
    if rank == 0:
        write_table(pa.Table.from_pylist(rows, schema=TRAIN_LOG), out / "train_log.parquet")
    return stats


def load_data(cfg: Config, inputs: dict[str, Path], specs: list[MethodSpec], out: Path, rank: int) -> Data:
    documents = load_documents(inputs["prepare"])
    tokenizer = load_tokenizer(inputs["prepare"])
    forget = attach_selection(load_split(documents, "forget"), Path(inputs["masks"]) / "masks.parquet")
    retain = load_split(documents, "retain")
    kinds = sorted({kind for spec in specs for kind in spec.reference})
    idk = idk_split(documents, forget, tokenizer) if "idk" in kinds else None
    table = pa.Table.from_pylist([], schema=REF_LOGPROBS)
    reference: Reference | ModelReference | None = None
    if kinds:  # the frozen target, before any method changes a copy of it
        model = load_model(Path(inputs["target"]) / TARGET_DIR)
        if torch.cuda.is_available():
            model = model.to(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
            if cfg.unlearn.bf16:
                model = model.to(torch.bfloat16)  # the same precision the bf16 engine trains in
        if cfg.unlearn.reference == "model":
            reference = ModelReference(model)
        else:
            splits = {"forget": forget, "idk": idk, "retain": retain}
            table = reference_table(
                model, {k: splits[k] for k in kinds if k in splits}, tokenizer.pad_token_id, 4 * cfg.unlearn.batch_size
            )
            layers = {s.layer(model.config.num_hidden_layers) for s in specs if "retain_hidden" in s.reference}
            hidden = [hidden_table(model, retain, layer, tokenizer.pad_token_id, 4 * cfg.unlearn.batch_size)
                      for layer in sorted(layers)]
            table = pa.concat_tables([t.cast(REF_LOGPROBS) for t in [table, *hidden]])
            reference = Reference(table)
            del model
    if rank == 0:  # empty when no method reads reference values, or when the model itself is kept
        write_table(table, out / "ref_logprobs.parquet")
    return Data(forget, retain, idk, reference, tokenizer.pad_token_id)


def deepspeed_config(u: UnlearnConfig, world: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": max(1, u.batch_size // world),
        "gradient_accumulation_steps": u.grad_accum,
        "zero_optimization": {"stage": u.zero_stage},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no DeepSpeed C++ op to compile
        "bf16": {"enabled": bool(u.bf16 and torch.cuda.is_available())},
        "gradient_clipping": 1.0,
        "steps_per_print": 2**31 - 1,
    }


@dataclass
class Run:
    """One method's training state: the engine, the plan, and what the loop has produced so far."""

    engine: Any
    plan: list[tuple[int, np.ndarray, np.ndarray]]
    first: int  # the first micro step to run (after a resume)
    rows: list[dict]  # log rows of the steps checked so far
    checkpoints: Path | None  # DeepSpeed checkpoints a killed run resumes from
    snapshots: Path  # snapshots/<method>/, in scratch when there is one (it survives a kill)
    bar: Any
    offset: float  # seconds of a killed run, so the log's clock continues
    start: float = field(default_factory=time.perf_counter)
    pending: list[tuple[int, int, float, Any]] = field(default_factory=list)  # (step, epoch, seconds, values) per micro
    peak_mb: float = 0.0
    stopped: int | None = None
    prob: float | None = None
    state: dict[str, Any] = field(default_factory=dict)  # what the loss carries across steps (Outputs.state)


def train_method(
    u: UnlearnConfig, spec: MethodSpec, data: Data, target_dir: Path, out: Path, scratch: Path | None = None
) -> tuple[list[dict], dict[str, Any]]:
    """Train one method from the target's weights; writes out/<method>/ (and its snapshots), returns (log, stats)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    finished = reuse_finished(spec.name, out, scratch, rank)
    if finished is not None:
        return finished
    run = start_run(u, spec, data, target_dir, out, scratch, world)
    for micro in range(run.first, len(run.plan)):
        epoch, forget_rows, retain_rows = run.plan[micro]
        outputs, forget_nll, retain_nll = step_outputs(
            run.engine, spec, data, forget_rows[rank::world], retain_rows[rank::world], epoch, run.state
        )
        loss = spec(outputs, u.alpha)
        run.engine.backward(loss)
        run.engine.step()
        step = micro // u.grad_accum + 1
        values = torch.stack([loss.detach().float(), forget_nll, retain_nll])
        run.pending.append((step, epoch, run.offset + time.perf_counter() - run.start, values))
        if (micro + 1) % u.grad_accum == 0 and end_of_step(run, u, spec, data, step, micro):
            break
    check_log(run, spec.name, u, world)
    seconds = run.offset + time.perf_counter() - run.start
    save_model(run.engine, u.zero_stage, out / spec.name, rank)
    run.engine.destroy()
    snapshots = publish_snapshots(run, out / "snapshots" / spec.name, rank)
    rows, stats = run.rows, method_stats(run, u, spec, seconds, snapshots)
    del run
    gc.collect()
    log.info("unlearn %s: %d steps, forget NLL %.3f, %.1fs", spec.name, len(rows), stats["forget_loss"], seconds)
    keep_finished(spec.name, out, scratch, rows, stats, rank)
    return rows, stats


def start_run(
    u: UnlearnConfig, spec: MethodSpec, data: Data, target_dir: Path, out: Path, scratch: Path | None, world: int
) -> Run:
    """A DeepSpeed engine on a fresh copy of the target, the plan of micro steps, and the newest checkpoint's state."""
    import deepspeed

    seed_everything(u.seed)
    model = with_lora(load_model(target_dir), u.lora)
    group = spec.trainable([name for name, _ in model.named_parameters()], model.config.num_hidden_layers)
    if group is not None:  # the method's own parameter group (rmu); the rest stays frozen
        for name, param in model.named_parameters():
            param.requires_grad_(name in group)
    optimizer = torch.optim.AdamW(trainable(model), lr=u.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(u, world))
    if world == 1 and u.zero_stage == 0:  # averaging gradients over a world of one copies them for nothing
        engine.enable_backward_allreduce = False
    plan = schedule(len(data.forget), len(data.retain), u.batch_size, u.epochs, u.seed, min_rows=world)
    plan = plan[: len(plan) // u.grad_accum * u.grad_accum]  # only whole optimizer steps
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    checkpoints = scratch / spec.name if scratch is not None and u.checkpoint_every else None
    state: dict[str, Any] = {}
    first, rows = load_checkpoint(engine, checkpoints, state) if checkpoints is not None else (0, [])
    snapshots = (scratch if scratch is not None else out) / "snapshots" / spec.name
    bar = Progress("unlearn", len(plan) // u.grad_accum, model=spec.name, initial=len(rows),
                   enabled=torch.distributed.get_rank() == 0)
    return Run(engine, plan, first, rows, checkpoints, snapshots, bar, rows[-1]["seconds"] if rows else 0.0,
               peak_mb=memory_mb(), state=state)


def end_of_step(run: Run, u: UnlearnConfig, spec: MethodSpec, data: Data, step: int, micro: int) -> bool:
    """The work between optimizer steps: the divergence check and log, the early stop, a snapshot, a checkpoint.

    The check runs every unlearn.divergence_check_every steps and before anything is saved, so a diverged model is
    never written. True when the early stop ends training here.
    """
    last = micro + 1 == len(run.plan)
    epoch_end = last or run.plan[micro + 1][0] != run.plan[micro][0]
    checkpoint = run.checkpoints is not None and step % u.checkpoint_every == 0 and not last
    snapshot = bool(u.snapshot_every) and step % u.snapshot_every == 0 and not last
    due = bool(u.checkpoint_every) and step % u.checkpoint_every == 0 and not last
    stop_check = u.stop_forget_prob is not None and (
        (step % u.stop_check_every == 0 if u.stop_check_every else due) or epoch_end
    )
    if checkpoint or snapshot or stop_check or step % u.divergence_check_every == 0:
        check_log(run, spec.name, u, torch.distributed.get_world_size())
    if stop_check:
        run.prob = forget_prob(run.engine, data, u.batch_size)
        if run.prob <= u.stop_forget_prob:
            run.stopped = step
            return True
    if snapshot:
        save_snapshot(run.engine, u.zero_stage, run.snapshots, step)
    if checkpoint:
        save_checkpoint(run.engine, run.checkpoints, step, micro + 1, run.rows, run.state)
    return False


def check_log(run: Run, method: str, u: UnlearnConfig, world: int) -> None:
    """Bring the pending micro steps' values to the host at once, check each for divergence, and add the log rows of
    the optimizer steps they complete."""
    if not run.pending:
        return
    values = torch.stack([v for *_, v in run.pending])
    if world > 1:  # every rank takes the same divergence decision
        torch.distributed.all_reduce(values)
        values /= world
    values = values.cpu()
    for (step, *_), (loss, forget_nll, retain_nll) in zip(run.pending, values.tolist(), strict=True):
        check_divergence(method, step, loss, forget_nll, retain_nll, u)
    for lo in range(0, len(run.pending), u.grad_accum):
        step, epoch, seconds, _ = run.pending[lo + u.grad_accum - 1]
        mean_loss, forget_loss, retain_loss = values[lo : lo + u.grad_accum].mean(0).tolist()
        run.rows.append({"model": method, "step": step, "epoch": epoch, "loss": mean_loss, "forget_loss": forget_loss,
                         "retain_loss": retain_loss, "lr": run.engine.get_lr()[0], "seconds": seconds})
    run.pending = []
    run.peak_mb = max(run.peak_mb, memory_mb())
    run.bar.update(run.rows[-1]["step"] - run.bar.n, forget_loss=run.rows[-1]["forget_loss"],
                   retain_loss=run.rows[-1]["retain_loss"])


def method_stats(run: Run, u: UnlearnConfig, spec: MethodSpec, seconds: float, snapshots: list[int]) -> dict:
    run.bar.close()
    rows = run.rows
    last = rows[-1] if rows else {"forget_loss": math.nan, "retain_loss": math.nan, "step": 0}
    stats = {
        "steps": len(rows),
        "last_step": last["step"],
        "snapshots": snapshots,
        "forget_loss": last["forget_loss"],
        "retain_loss": last["retain_loss"],
        "seconds": seconds,
        "step_seconds": seconds / max(1, len(rows)),
        "peak_memory_mb": max(run.peak_mb, memory_mb()),
        "resumed_from_step": run.first // u.grad_accum,
        "params": spec.params,
        "reference": u.reference if spec.reference else None,
    }
    if u.stop_forget_prob is not None:  # the last step always checks, so prob is that of the saved model
        stats.update(stopped_at_step=run.stopped, forget_prob=run.prob)
    return stats


def reuse_finished(method: str, out: Path, scratch: Path | None, rank: int) -> tuple[list[dict], dict] | None:
    """(log, stats) of a method that a killed run finished, its model and snapshots linked into `out`; else None."""
    done = scratch / f"{method}.done" if scratch is not None else None
    if done is None or not (done / "result.json").is_file():
        return None
    result = json.loads((done / "result.json").read_text())
    if rank == 0:
        shutil.copytree(done / "model", out / method, copy_function=os.link)
        link_snapshots(scratch / "snapshots" / method, out / "snapshots" / method, result["stats"]["snapshots"])
    log.info("unlearn %s: reusing the model a killed run finished", method)
    return result["rows"], {**result["stats"], "reused": True}


def keep_finished(method: str, out: Path, scratch: Path | None, rows: list[dict], stats: dict, rank: int) -> None:
    """Keep a finished method in scratch (a kill during a later method then reuses it) and drop its checkpoints."""
    if scratch is None or rank != 0:
        return
    done = scratch / f"{method}.done"
    shutil.rmtree(done, ignore_errors=True)
    shutil.copytree(out / method, done / "model", copy_function=os.link)
    write_json_atomic(done / "result.json", {"rows": rows, "stats": stats})
    shutil.rmtree(scratch / method, ignore_errors=True)


def save_snapshot(engine, zero_stage: int, folder: Path, step: int) -> None:
    """The weights after `step` as folder/step-<step>/ (safetensors + config), written to a temporary folder first."""
    rank = torch.distributed.get_rank()
    final, tmp = folder / f"step-{step}", folder / f".tmp-step-{step}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    save_model(engine, zero_stage, tmp, rank)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)  # a killed run's copy of a step this run computed again
        os.rename(tmp, final)


def publish_snapshots(run: Run, dest: Path, rank: int) -> list[int]:
    """The snapshot steps of this run, before its last step; linked into `dest` when they were written to scratch."""
    last = run.rows[-1]["step"] if run.rows else 0
    found = [int(p.name.removeprefix("step-")) for p in run.snapshots.glob("step-*")] if run.snapshots.is_dir() else []
    steps = sorted(k for k in found if k < last)
    if rank == 0 and run.snapshots != dest:
        link_snapshots(run.snapshots, dest, steps)
    return steps


def link_snapshots(source: Path, dest: Path, steps: list[int]) -> None:
    for k in steps:
        shutil.copytree(source / f"step-{k}", dest / f"step-{k}", copy_function=os.link)


def save_checkpoint(
    engine, folder: Path, step: int, next_micro: int, rows: list[dict], state: dict | None = None
) -> None:
    """Weights, optimizer state, the position in the plan, the log so far, the RNG states and the loss's state;
    keeps only this one."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    engine.save_checkpoint(str(folder), tag=f"step{step}", client_state={"next_micro": next_micro, "rows": rows,
                                                                        "rng": rng, "state": state or {}})
    if torch.distributed.get_rank() == 0:  # DeepSpeed wrote `latest` last, so older tags are no longer needed
        for old in folder.glob("step*"):
            if old.name != f"step{step}":
                shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, folder: Path, state: dict | None = None) -> tuple[int, list[dict]]:
    """(first micro step to run, log rows so far) from the newest checkpoint in `folder`; (0, []) without one.

    Fills `state` with the loss's state it saved."""
    latest = folder / "latest"
    tag = latest.read_text().strip() if latest.is_file() else ""
    if not tag or not (folder / tag).is_dir():  # none yet, or a kill while DeepSpeed wrote `latest`
        return 0, []
    _, client = engine.load_checkpoint(str(folder), tag=tag)
    random.setstate(client["rng"]["python"])
    np.random.set_state(client["rng"]["numpy"])
    torch.set_rng_state(client["rng"]["torch"])
    if state is not None:
        state.update(client.get("state", {}))
    log.info("unlearn: resuming from checkpoint %s", folder / tag)
    return client["next_micro"], client["rows"]


def forget_prob(engine, data: Data, batch_size: int) -> float:
    """Mean over forget items of P(a|q) = exp(-mean NLL of the answer), teacher-forced: TOFU's forget probability
    (docs/metrics.md), scored as evaluate scores it; what unlearn.stop_forget_prob compares with."""
    encoded = list(zip(data.forget.input_ids, data.forget.answer_start, strict=True))
    return float(np.mean(np.exp(-score_sequences(engine, encoded, data.pad_id, batch_size).nll_avg)))


def step_outputs(
    engine,
    spec: MethodSpec,
    data: Data,
    forget_rows: np.ndarray,
    retain_rows: np.ndarray,
    epoch: int = 0,
    state: dict | None = None,
) -> tuple[Outputs, torch.Tensor, torch.Tensor]:
    """The method's inputs for one micro step, plus the forget and retain NLL over all answer tokens (for the log)."""
    device = engine.device
    layer = spec.layer(engine.module.config.num_hidden_layers) if "hidden" in spec.inputs else None

    def forward(batch):
        ids = batch.input_ids.to(device)
        with layer_output(engine.module, layer) as hidden:
            logits = engine(input_ids=ids, attention_mask=batch.attention_mask.to(device)).logits
        return logits, token_logprobs(logits, ids), hidden[0] if hidden else None

    forget, retain = collate(data.forget, forget_rows, data.pad_id), collate(data.retain, retain_rows, data.pad_id)
    forget_logits, forget_logp, forget_hidden = forward(forget)
    retain_logits, retain_logp, retain_hidden = forward(retain)
    outputs = Outputs(
        forget_logp=forget_logp,
        forget_mask=(forget.labels(spec.selective) != -100).to(device),
        forget_answer_mask=forget.answer_mask.to(device),
        retain_logp=retain_logp,
        retain_mask=retain.answer_mask.to(device),
        forget_logits=forget_logits,
        forget_ids=forget.input_ids.to(device),
        forget_hidden=forget_hidden,
        retain_hidden=retain_hidden,
        epoch=epoch,
        state=state if state is not None else {},
    )
    ref = data.reference
    if "forget" in spec.reference:
        outputs.ref_forget_logp = ref.token_logprobs("forget", forget).to(device)
    if "idk" in spec.reference:
        idk = collate(data.idk, forget_rows, data.pad_id)
        _, outputs.idk_logp, _ = forward(idk)
        outputs.idk_mask = idk.answer_mask.to(device)
        outputs.ref_idk_logp = ref.token_logprobs("idk", idk).to(device)
    if "retain" in spec.reference:
        top_logp, top_ids = ref.topk(retain)
        outputs.retain_logits = retain_logits
        outputs.ref_retain_topk_logp, outputs.ref_retain_topk_ids = top_logp.to(device), top_ids.to(device)
    if "retain_hidden" in spec.reference:
        outputs.ref_retain_hidden = ref.hidden(retain, layer).to(device)
    if "forget_logits" in spec.reference:
        outputs.ref_forget_logits = ref.logits(forget).to(device)
    with torch.no_grad():
        forget_nll = nll(forget_logp, forget.answer_mask.to(device))
        retain_nll = nll(retain_logp, outputs.retain_mask)
    return outputs, forget_nll, retain_nll


def check_divergence(
    method: str, step: int, loss: float, forget_nll: float, retain_nll: float, u: UnlearnConfig
) -> None:
    if not (math.isfinite(loss) and math.isfinite(forget_nll) and math.isfinite(retain_nll)):
        raise UnlearnDiverged(f"{method}: loss became {loss} at step {step}; lower unlearn.lr (now {u.lr})")
    if forget_nll > u.max_forget_loss:
        raise UnlearnDiverged(
            f"{method}: forget NLL {forget_nll:.1f} passed unlearn.max_forget_loss={u.max_forget_loss} at step {step}; "
            f"lower unlearn.lr (now {u.lr}) or raise unlearn.max_forget_loss"
        )


def save_model(engine, zero_stage: int, path: Path, rank: int) -> None:
    """Rank 0 writes safetensors (LoRA adapters merged in); under ZeRO-3 every rank first gathers the full
    parameters."""
    import deepspeed

    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank == 0:
                engine.module.save_pretrained(path)
    elif rank == 0:
        merged(engine.module).save_pretrained(path)
    torch.distributed.barrier()


def memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return psutil.Process().memory_info().rss / 2**20
