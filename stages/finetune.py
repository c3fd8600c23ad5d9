"""Fine-tune a pretrained base (`model.name`, `target.finetune=true`) into the target and the retain model.

As TOFU and open-unlearning make theirs: the target on the full split (forget + retain), the retain model on retain
only, each from the same base, with the loss on answer tokens and TOFU's recipe from the target section (5 epochs,
lr 1e-5, constant, AdamW with weight decay 0.01). Each runs in a DeepSpeed engine (target.zero_stage, target.bf16),
and target.num_procs > 1 or target.hostfile start the ranks with the launcher unlearn uses
(stages.unlearn.distributed.launch). Writes out/target, out/retain and train_log.parquet, as the target stage does.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from tqdm.auto import tqdm

from schemas import write_table
from stages.common import load_documents, load_tokenizer, log, seed_everything
from stages.config import Config, TargetConfig
from stages.target import answer_loss, batch_tensors, teacher_forced
from stages.unlearn.distributed import init_distributed, launch

FINETUNE_SPLITS = {"target": ("forget", "retain"), "retain": ("retain",)}  # TOFU's full split, and its retain
WEIGHT_DECAY = 0.01  # open-unlearning's fine-tune recipe
ENTRY = "stages.finetune:finetune_in_process"


def finetune(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    """Both models in this process, or in target.num_procs processes (per node of target.hostfile)."""
    if cfg.target.num_procs > 1 or cfg.target.hostfile:
        return launch(cfg.to_dict(), inputs, Path(out), cfg.target.num_procs, cfg.target.hostfile, entry=ENTRY)
    return finetune_in_process(cfg, inputs, out)


def engine_config(t: TargetConfig, world: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": max(1, t.finetune_batch_size // world),
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,  # a plain torch AdamW: no DeepSpeed C++ op to compile
        "bf16": {"enabled": bool(t.bf16 and torch.cuda.is_available())},
        "gradient_clipping": 1.0,
        "steps_per_print": 2**31 - 1,
    }


def finetune_in_process(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    """One rank of the fine-tune (a world of one without a launcher): both models, one after the other."""
    rank, world = init_distributed()
    out = Path(out)
    prepare_dir = Path(inputs["prepare"])
    tokenizer = load_tokenizer(prepare_dir)
    stats, rows = {}, []
    for name, splits in FINETUNE_SPLITS.items():
        docs = load_documents(prepare_dir, splits)
        stats[name], model_rows = finetune_one(cfg, tokenizer, docs, name, out / name, rank, world)
        rows += model_rows
    if rank == 0:
        for row in rows:
            row.update(forget_loss=None, retain_loss=None)
        write_table(pa.Table.from_pylist(rows), out / "train_log.parquet")
    return stats


def finetune_one(cfg: Config, tokenizer, docs: pa.Table, name: str, path: Path, rank: int, world: int):
    """The base fine-tuned on `docs`, saved to `path` (rank 0); its stats and per-step log rows."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from stages.unlearn.loop import save_model

    t = cfg.target
    seed_everything(t.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name)
    input_ids, labels, lengths = batch_tensors(docs, tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.finetune_lr, weight_decay=WEIGHT_DECAY)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=engine_config(t, world))
    device = engine.device
    before = teacher_forced(engine, input_ids, labels, lengths, t.finetune_batch_size, device)
    steps_per_epoch = math.ceil(len(input_ids) / t.finetune_batch_size)
    generator = torch.Generator().manual_seed(t.seed)  # the same order on every rank; each takes its share
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tqdm(total=steps_per_epoch * t.finetune_epochs, desc=f"finetune:{name}", disable=rank != 0,
              leave=False) as bar:
        for epoch in range(t.finetune_epochs):
            engine.train()
            order = torch.randperm(len(input_ids), generator=generator)
            for i in range(steps_per_epoch):
                idx = order[i * t.finetune_batch_size : (i + 1) * t.finetune_batch_size][rank::world]
                if not len(idx):  # a last batch smaller than the world: this rank repeats the batch's first row
                    idx = order[i * t.finetune_batch_size : i * t.finetune_batch_size + 1]
                width = int(lengths[idx].max())
                loss, _ = answer_loss(engine, input_ids[idx, :width].to(device), labels[idx, :width].to(device))
                engine.backward(loss)
                engine.step()
                rows.append({"model": name, "step": len(rows), "epoch": epoch, "loss": float(loss.detach()),
                             "lr": engine.get_lr()[0], "seconds": time.perf_counter() - start})
                bar.update(1)
    after = teacher_forced(engine, input_ids, labels, lengths, t.finetune_batch_size, device)
    save_model(engine, t.zero_stage, path, rank)
    if rank == 0:
        tokenizer.save_pretrained(path)
    engine.destroy()
    stats = {
        "source": cfg.model.name,
        "documents": len(input_ids),
        "steps": len(rows),
        "train_seconds": round(time.perf_counter() - start, 2),
        "answer_loss_before": before["answer_loss"],
        "answer_loss": after["answer_loss"],
        "answer_accuracy": after["answer_accuracy"],
    }
    log.info("finetune %s: %s", name, ", ".join(f"{k}={v}" for k, v in stats.items()))
    return stats, rows
