"""Peak memory of unlearning with the reference log-probs artifact against keeping the frozen reference model, and
of LoRA adapters (unlearn.lora.r) against training every weight.

Both sides run the unlearn loop itself (`unlearn_in_process`, npo_gd, one epoch of the micro preset's data) on the
same target, once with `unlearn.reference=logprobs` (the default: the reference's values are computed once, then the
model is dropped) and once with `unlearn.reference=model` (the frozen copy sits beside the trained one, as in the
field's reference framework). Each side runs in a fresh spawned process, whose peak RSS (ru_maxrss) covers
everything it did, loading and the reference pass included; on a GPU the CUDA peak is reported too. The target is an
untrained Llama large enough that its weights, not the Python runtime, dominate: memory does not depend on training.
The LoRA side is the logprobs side with rank-LORA_R adapters on every linear layer: no gradients or AdamW state for
the full weights.
"""

from __future__ import annotations

import multiprocessing
import resource
import tempfile
from pathlib import Path
from typing import Any

from bench.report import Result, Row
from stages.config import Config, TargetConfig, load_config

METHOD = "npo_gd"  # reads the reference's log-prob of every forget answer token
LORA_R = 8
SIDES = {"logprobs": ["unlearn.reference=logprobs"], "model": ["unlearn.reference=model"],
         "lora": ["unlearn.reference=logprobs", f"unlearn.lora.r={LORA_R}"]}


def build_inputs(root: Path, size: TargetConfig) -> dict[str, Path]:
    """The micro preset's prepare → assistants → scores → masks, and a target of the given size."""
    from stages.assistants import train_assistants
    from stages.masks import build_masks
    from stages.prepare import prepare
    from stages.scores import score_tokens
    from stages.target import build_model

    cfg = load_config("micro")
    dirs = {name: root / name for name in ("prepare", "assistants", "scores", "masks", "target")}
    for folder in dirs.values():
        folder.mkdir(parents=True)
    prepare(cfg, {}, dirs["prepare"])
    train_assistants(cfg, {"prepare": dirs["prepare"]}, dirs["assistants"])
    score_tokens(cfg, {"prepare": dirs["prepare"], "assistants": dirs["assistants"]}, dirs["scores"])
    build_masks(cfg, {"scores": dirs["scores"]}, dirs["masks"])
    from stages.common import load_tokenizer

    build_model(size, load_tokenizer(dirs["prepare"])).save_pretrained(dirs["target"] / "target")
    return {k: dirs[k] for k in ("prepare", "target", "masks")}


def _unlearn_once(inputs: dict[str, Path], out: Path, overrides: list[str]) -> dict[str, Any]:
    """In a fresh process: one unlearn run; its peak RSS over the whole process lifetime, and the loop's stats."""
    from stages.environment import configure_environment

    configure_environment()
    from stages.unlearn.distributed import init_distributed
    from stages.unlearn.loop import unlearn_in_process

    cfg: Config = load_config("micro", overrides=[f"unlearn.methods={METHOD}", "unlearn.checkpoint_every=0",
                                                  *overrides])
    init_distributed()
    out.mkdir(parents=True)
    stats = unlearn_in_process(cfg, inputs, out)[METHOD]
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "loop_peak_mb": stats["peak_memory_mb"], "steps": stats["steps"], "step_seconds": stats["step_seconds"]}


def run(size: TargetConfig) -> Result:
    with tempfile.TemporaryDirectory(prefix="sunlearn-bench-memory-") as tmp:
        root = Path(tmp)
        inputs = build_inputs(root, size)
        weights_mb = (inputs["target"] / "target" / "model.safetensors").stat().st_size / 2**20
        sides = {}
        for side, overrides in SIDES.items():
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                sides[side] = pool.apply(_unlearn_once, (inputs, root / f"out-{side}", overrides))
    ours, theirs = sides["logprobs"]["peak_rss_mb"], sides["model"]["peak_rss_mb"]
    lora = sides["lora"]["peak_rss_mb"]
    result = Result("memory")
    shape = f"{size.num_layers}×{size.hidden_size} Llama, {weights_mb:.0f} MB of weights"
    result.rows = [
        Row("reference log-probs vs frozen reference model", f"{METHOD}, peak RSS of the whole run, {shape}",
            f"{ours:.0f} MB", f"{theirs:.0f} MB", f"{ours / theirs:.3f}×", "< 1×"),
        Row(f"LoRA r={LORA_R} vs full unlearning", f"{METHOD}, peak RSS of the whole run, {shape}",
            f"{lora:.0f} MB", f"{ours:.0f} MB", f"{lora / ours:.3f}×", "< 1×"),
    ]
    result.ratios = {"memory_logprobs_vs_model": ours / theirs, "memory_lora_vs_full": lora / ours}
    result.details = {**{f"{k}_{m}": v for k, side in sides.items() for m, v in side.items()},
                      "weights_mb": weights_mb, "saved_mb": theirs - ours}
    return result
