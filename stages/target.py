"""Target: the model to unlearn from, and the retain model that forget quality compares it with.

With no `model.name`, both are tiny Llama models trained from scratch with the same recipe (loss on answer tokens
only): `target` on forget + retain + real_authors + world_facts, `retain` on everything but forget. With a
`model.name` and `target.finetune`, both are fine-tuned from it (stages/finetune.py); without `target.finetune`, the
target is that model as is, and the retain model is `model.retain_name` (or absent).
Writes out/target, out/retain (each a save_pretrained folder with the tokenizer) and train_log.parquet.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from schemas import write_table
from stages.common import load_documents, load_tokenizer, log, pick_device, seed_everything
from stages.config import Config, ConfigError, TargetConfig

MODEL_SPLITS = {
    "target": ("forget", "retain", "real_authors", "world_facts"),
    "retain": ("retain", "real_authors", "world_facts"),
}
MAX_POSITIONS = 2048  # room for prompt + generation at evaluation; RoPE adds no parameters
WARMUP_FRACTION = 0.05
PROGRESS_SECONDS = 60.0  # a log line (which the Prefect UI shows) at least this often, at an epoch's end
FINAL_LR_FRACTION = 0.1


def batch_tensors(docs: pa.Table, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, labels (-100 on prompt and padding) and lengths of every document."""
    ids = docs["input_ids"].to_pylist()
    lengths = torch.tensor([len(x) for x in ids])
    starts = torch.tensor(docs["answer_start"].to_numpy(zero_copy_only=False).astype(np.int64))
    flat = torch.tensor(np.concatenate(ids).astype(np.int64))
    positions = torch.arange(int(lengths.max()))
    valid = positions[None, :] < lengths[:, None]
    input_ids = torch.full(valid.shape, pad_id, dtype=torch.long)
    input_ids[valid] = flat
    labels = torch.where(valid & (positions[None, :] >= starts[:, None]), input_ids, torch.full_like(input_ids, -100))
    return input_ids, labels, lengths


def answer_loss(model, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over answer tokens, and per-position correctness of the argmax (False off-answer)."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1), ignore_index=-100)
    return loss, (logits.argmax(-1) == target) & (target != -100)


@torch.no_grad()
def teacher_forced(model, input_ids, labels, lengths, batch_size: int, device: str) -> dict[str, float]:
    """Answer-token loss and accuracy (exact memorisation) over the whole set, teacher-forced."""
    model.eval()
    total_loss = correct = count = 0.0
    for i in range(0, len(input_ids), batch_size):
        width = int(lengths[i : i + batch_size].max())
        x, y = input_ids[i : i + batch_size, :width].to(device), labels[i : i + batch_size, :width].to(device)
        n = int((y[:, 1:] != -100).sum())
        loss, hits = answer_loss(model, x, y)
        total_loss += float(loss) * n
        correct += float(hits.sum())
        count += n
    return {"answer_loss": total_loss / count, "answer_accuracy": correct / count}


def build_model(tcfg: TargetConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tcfg.hidden_size,
        num_hidden_layers=tcfg.num_layers,
        num_attention_heads=tcfg.num_heads,
        num_key_value_heads=tcfg.num_heads,
        intermediate_size=tcfg.intermediate_size,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def _schedule(step: int, total: int) -> float:
    """Linear warm-up, then cosine decay to FINAL_LR_FRACTION of the peak."""
    warmup = max(1, int(WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def train_from_scratch(
    tcfg: TargetConfig, tokenizer, docs: pa.Table, name: str, device: str
) -> tuple[Any, dict[str, Any], list[dict[str, Any]]]:
    """One model trained on `docs`; returns it, its stats and its per-step log rows."""
    seed_everything(tcfg.seed)
    model = build_model(tcfg, tokenizer).to(device)
    input_ids, labels, lengths = batch_tensors(docs, tokenizer.pad_token_id)
    before = teacher_forced(model, input_ids, labels, lengths, 4 * tcfg.batch_size, device)
    steps_per_epoch = math.ceil(len(input_ids) / tcfg.batch_size)
    total = steps_per_epoch * tcfg.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total))
    generator = torch.Generator().manual_seed(tcfg.seed)
    rows: list[dict[str, Any]] = []
    start = logged = time.perf_counter()
    model.train()
    with tqdm(total=total, desc=f"target:{name}", unit="step", leave=False) as bar:
        for epoch in range(tcfg.epochs):
            order = torch.randperm(len(input_ids), generator=generator)
            epoch_loss = 0.0
            for i in range(steps_per_epoch):
                idx = order[i * tcfg.batch_size : (i + 1) * tcfg.batch_size]
                width = int(lengths[idx].max())
                x, y = input_ids[idx, :width].to(device), labels[idx, :width].to(device)
                loss, _ = answer_loss(model, x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                epoch_loss += float(loss.detach())
                rows.append(
                    {
                        "model": name,
                        "step": len(rows),
                        "epoch": epoch,
                        "loss": float(loss.detach()),
                        "lr": optimizer.param_groups[0]["lr"],
                        "seconds": time.perf_counter() - start,
                    }
                )
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{rows[-1]['loss']:.3f}")
            now = time.perf_counter()
            if epoch == tcfg.epochs - 1 or (epoch + 1) % 10 == 0 or now - logged >= PROGRESS_SECONDS:
                log.info("target %s: epoch %d/%d, mean loss %.4f, %.0f s", name, epoch + 1, tcfg.epochs,
                         epoch_loss / steps_per_epoch, now - start)
                logged = now
    train_seconds = time.perf_counter() - start
    after = teacher_forced(model, input_ids, labels, lengths, 4 * tcfg.batch_size, device)
    stats = {
        "documents": len(input_ids),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": total,
        "train_seconds": round(train_seconds, 2),
        "answer_loss_before": before["answer_loss"],
        "answer_loss": after["answer_loss"],
        "answer_accuracy": after["answer_accuracy"],
    }
    log.info("target %s: %s", name, ", ".join(f"{k}={v}" for k, v in stats.items()))
    return model.cpu(), stats, rows


def _load_pretrained(name: str, field: str):
    from transformers import AutoModelForCausalLM

    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise ConfigError(f"{field} path {name} does not exist")
    try:
        return AutoModelForCausalLM.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load {field} {name}: {str(exc).strip().splitlines()[0]}") from None


def train_target(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepare_dir = Path(inputs["prepare"])
    tokenizer = load_tokenizer(prepare_dir)
    stats: dict[str, Any] = {}
    if cfg.model.name is not None and cfg.target.finetune:
        from stages.finetune import finetune

        return finetune(cfg, inputs, out)
    if cfg.model.name is None:
        device = pick_device()
        rows: list[dict[str, Any]] = []
        for name, splits in MODEL_SPLITS.items():
            docs = load_documents(prepare_dir, splits)
            model, stats[name], log_rows = train_from_scratch(cfg.target, tokenizer, docs, name, device)
            model.save_pretrained(out / name)
            tokenizer.save_pretrained(out / name)
            rows.extend(log_rows)
        for row in rows:
            row.update(forget_loss=None, retain_loss=None)
        write_table(pa.Table.from_pylist(rows), out / "train_log.parquet")
        return stats
    for name, model_name in (("target", cfg.model.name), ("retain", cfg.model.retain_name)):
        if model_name is None:
            log.warning("no model.retain_name: there is no retain model, so forget quality will be NaN")
            stats[name] = None
            continue
        model = _load_pretrained(model_name, "model.name" if name == "target" else "model.retain_name")
        model.save_pretrained(out / name)
        tokenizer.save_pretrained(out / name)
        stats[name] = {"source": model_name, "parameters": sum(p.numel() for p in model.parameters())}
    return stats
