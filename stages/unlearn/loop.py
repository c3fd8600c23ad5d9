"""The one loop every method shares: a DeepSpeed engine per method, forget batches each paired with a retain batch,
a divergence guard, and one train_log row per optimizer step. A method only supplies its loss (methods.py).
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.config import Config, UnlearnConfig
from schemas import REF_LOGPROBS, TRAIN_LOG, write_table
from stages.common import load_documents, load_model, load_tokenizer, log, seed_everything
from stages.unlearn.data import Split, attach_selection, collate, idk_split, load_split, schedule
from stages.unlearn.distributed import init_distributed, launch, world_size
from stages.unlearn.methods import METHODS, MethodSpec, Outputs, nll, token_logprobs
from stages.unlearn.reference import Reference, reference_table

TARGET_DIR = "target"  # inside the target stage's folder


class UnlearnDiverged(RuntimeError):
    """A method's loss became non-finite or its forget NLL passed unlearn.max_forget_loss."""


@dataclass
class Data:
    forget: Split
    retain: Split
    idk: Split | None
    reference: Reference | None
    pad_id: int


def unlearn(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    """Unlearn with every method of cfg.unlearn.methods; writes out/<method>/, train_log and ref_logprobs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.unlearn.num_procs > 1 and world_size() != cfg.unlearn.num_procs:
        return launch(cfg.to_dict(), inputs, out, cfg.unlearn.num_procs)
    rank, _ = init_distributed()
    specs = [METHODS[name] for name in cfg.unlearn.methods]
    data = load_data(cfg, inputs, specs, out, rank)
    rows: list[dict] = []
    stats: dict[str, Any] = {}
    for spec in specs:
        method_rows, stats[spec.name] = train_method(cfg.unlearn, spec, data, Path(inputs["target"]) / TARGET_DIR, out)
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
    if kinds:  # the frozen target, once, before any method changes a copy of it
        model = load_model(Path(inputs["target"]) / TARGET_DIR)
        if cfg.unlearn.bf16 and torch.cuda.is_available():
            model = model.to(torch.bfloat16)  # the same precision the bf16 engine trains in
        splits = {"forget": forget, "idk": idk, "retain": retain}
        table = reference_table(
            model, {k: splits[k] for k in kinds}, tokenizer.pad_token_id, 4 * cfg.unlearn.batch_size
        )
        del model
    if rank == 0:
        write_table(table, out / "ref_logprobs.parquet")
    return Data(forget, retain, idk, Reference(table) if kinds else None, tokenizer.pad_token_id)


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


def train_method(
    u: UnlearnConfig, spec: MethodSpec, data: Data, target_dir: Path, out: Path
) -> tuple[list[dict], dict[str, Any]]:
    import deepspeed

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    seed_everything(u.seed)
    model = load_model(target_dir)
    optimizer = torch.optim.AdamW(model.parameters(), lr=u.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(u, world))
    plan = schedule(len(data.forget), len(data.retain), u.batch_size, u.epochs, u.seed, min_rows=world)
    plan = plan[: len(plan) // u.grad_accum * u.grad_accum]  # only whole optimizer steps
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rows, window, peak, start = [], [], memory_mb(), time.perf_counter()
    bar = tqdm(total=len(plan) // u.grad_accum, desc=spec.name, disable=rank != 0, leave=False)
    for micro, (epoch, forget_rows, retain_rows) in enumerate(plan):
        step = micro // u.grad_accum + 1
        outputs, forget_nll, retain_nll = step_outputs(
            engine, spec, data, forget_rows[rank::world], retain_rows[rank::world]
        )
        loss = spec(outputs, u.alpha)
        values = torch.stack([loss.detach().float(), forget_nll, retain_nll])
        if world > 1:  # every rank takes the same divergence decision
            torch.distributed.all_reduce(values)
            values /= world
        check_divergence(spec.name, step, *values.tolist(), u)
        engine.backward(loss)
        engine.step()
        window.append(values.cpu())
        if (micro + 1) % u.grad_accum == 0:
            mean_loss, forget_loss, retain_loss = torch.stack(window).mean(0).tolist()
            window = []
            rows.append(
                {
                    "model": spec.name,
                    "step": step,
                    "epoch": epoch,
                    "loss": mean_loss,
                    "forget_loss": forget_loss,
                    "retain_loss": retain_loss,
                    "lr": engine.get_lr()[0],
                    "seconds": time.perf_counter() - start,
                }
            )
            peak = max(peak, memory_mb())
            bar.update()
            bar.set_postfix(forget=f"{forget_loss:.3f}", retain=f"{retain_loss:.3f}")
    bar.close()
    seconds = time.perf_counter() - start
    save_model(engine, u.zero_stage, out / spec.name, rank)
    engine.destroy()
    del engine, model, optimizer
    gc.collect()
    last = rows[-1] if rows else {"forget_loss": math.nan, "retain_loss": math.nan}
    stats = {
        "steps": len(rows),
        "forget_loss": last["forget_loss"],
        "retain_loss": last["retain_loss"],
        "seconds": seconds,
        "step_seconds": seconds / max(1, len(rows)),
        "peak_memory_mb": peak,
    }
    log.info("unlearn %s: %d steps, forget NLL %.3f, %.1fs", spec.name, len(rows), stats["forget_loss"], seconds)
    return rows, stats


def step_outputs(
    engine, spec: MethodSpec, data: Data, forget_rows: np.ndarray, retain_rows: np.ndarray
) -> tuple[Outputs, torch.Tensor, torch.Tensor]:
    """The method's inputs for one micro step, plus the forget and retain NLL over all answer tokens (for the log)."""
    device = engine.device

    def forward(batch):
        ids = batch.input_ids.to(device)
        logits = engine(input_ids=ids, attention_mask=batch.attention_mask.to(device)).logits
        return logits, token_logprobs(logits, ids)

    forget, retain = collate(data.forget, forget_rows, data.pad_id), collate(data.retain, retain_rows, data.pad_id)
    _, forget_logp = forward(forget)
    retain_logits, retain_logp = forward(retain)
    outputs = Outputs(
        forget_logp=forget_logp,
        forget_mask=(forget.labels(spec.selective) != -100).to(device),
        retain_logp=retain_logp,
        retain_mask=retain.answer_mask.to(device),
    )
    ref = data.reference
    if "forget" in spec.reference:
        outputs.ref_forget_logp = ref.token_logprobs("forget", forget).to(device)
    if "idk" in spec.reference:
        idk = collate(data.idk, forget_rows, data.pad_id)
        _, outputs.idk_logp = forward(idk)
        outputs.idk_mask = idk.answer_mask.to(device)
        outputs.ref_idk_logp = ref.token_logprobs("idk", idk).to(device)
    if "retain" in spec.reference:
        top_logp, top_ids = ref.topk(retain)
        outputs.retain_logits = retain_logits
        outputs.ref_retain_topk_logp, outputs.ref_retain_topk_ids = top_logp.to(device), top_ids.to(device)
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
    """Rank 0 writes safetensors; under ZeRO-3 every rank first gathers the full parameters."""
    import deepspeed

    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank == 0:
                engine.module.save_pretrained(path)
    elif rank == 0:
        engine.module.save_pretrained(path)
    torch.distributed.barrier()


def memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return psutil.Process().memory_info().rss / 2**20
