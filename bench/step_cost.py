"""Step cost: SU against GradDiff on the same batches, through the unlearn loop's own helpers.

Two DeepSpeed engines start from the same weights (a tiny Llama of the target recipe); each step runs
`stages.unlearn.loop.step_outputs`, the method's loss, backward and the optimizer step, exactly as the loop does.
Steps alternate between the methods (and which goes first) so that load on the machine hits both alike. SU differs
from GradDiff only in its forget mask, so the question is whether building that mask costs anything.

Memory is the bytes autograd keeps for backward during one step (saved tensors, deduplicated by storage): the part
of a step's peak that depends on the loss. On a GPU, the CUDA peak of each step is reported as well.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.report import Result, Row
from stages.common import load_model, seed_everything
from stages.config import TargetConfig, UnlearnConfig
from stages.unlearn.data import Split, collate, schedule
from stages.unlearn.loop import Data, deepspeed_config, step_outputs, train_method
from stages.unlearn.methods import METHODS, Outputs, token_logprobs

STEP_VOCAB = 1024  # the embedded preset's tokenizer
METHOD_NAMES = ("su", "graddiff")


def synthetic_split(rng: np.random.Generator, n: int, selected_rate: float | None) -> Split:
    lengths = rng.integers(60, 140, n)
    ids = [rng.integers(3, STEP_VOCAB, k).astype(np.int64) for k in lengths]
    starts = rng.integers(10, 30, n).astype(np.int64)
    selected = None
    if selected_rate is not None:
        selected = [(rng.random(k) < selected_rate) & (np.arange(k) >= s) for k, s in zip(lengths, starts, strict=True)]
    return Split([f"d{i}" for i in range(n)], ids, starts, selected)


def tiny_llama(t: TargetConfig, vocab: int = STEP_VOCAB):
    """An untrained Llama of the target recipe (weights from seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                         num_attention_heads=t.num_heads, num_key_value_heads=t.num_heads,
                         intermediate_size=t.intermediate_size, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def build_engine(u: UnlearnConfig, t: TargetConfig):
    import deepspeed

    model = tiny_llama(t)
    optimizer = torch.optim.AdamW(model.parameters(), lr=u.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(u, 1))
    return engine


def one_step(engine, name: str, data: Data, forget_rows, retain_rows, u: UnlearnConfig, saved: dict | None) -> float:
    """Seconds of one full step; with `saved`, also records the bytes autograd keeps for backward."""
    spec = METHODS[name]

    def pack(tensor):
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    start = time.perf_counter()
    if saved is None:
        outputs, _, _ = step_outputs(engine, spec, data, forget_rows, retain_rows)
        loss = spec(outputs, u.alpha)
    else:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            outputs, _, _ = step_outputs(engine, spec, data, forget_rows, retain_rows)
            loss = spec(outputs, u.alpha)
    engine.backward(loss)
    engine.step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(steps: int, target: TargetConfig, big: TargetConfig | None = None) -> Result:
    from stages.unlearn.distributed import init_distributed

    init_distributed()
    u = UnlearnConfig()
    rng = np.random.default_rng(0)
    data = Data(synthetic_split(rng, 64, 0.25), synthetic_split(rng, 64, None), None, None, pad_id=0)
    engines = {name: build_engine(u, target) for name in METHOD_NAMES}
    plan = schedule(len(data.forget), len(data.retain), u.batch_size, steps // 8 + 2, u.seed)
    warmup = 2
    seconds: dict[str, list[float]] = {name: [] for name in METHOD_NAMES}
    saved_bytes: dict[str, int] = {}
    cuda_peak: dict[str, float] = {}
    for i, (_, forget_rows, retain_rows) in enumerate(plan[: steps + warmup]):
        for name in METHOD_NAMES if i % 2 == 0 else METHOD_NAMES[::-1]:
            saved = {} if i == 0 else None
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            elapsed = one_step(engines[name], name, data, forget_rows, retain_rows, u, saved)
            if saved is not None:
                saved_bytes[name] = sum(saved.values())
            if torch.cuda.is_available():
                cuda_peak[name] = max(cuda_peak.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
            if i >= warmup:
                seconds[name].append(elapsed)
    for engine in engines.values():
        engine.destroy()
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    ratio = median["su"] / median["graddiff"]
    memory_ratio = saved_bytes["su"] / saved_bytes["graddiff"]
    result = Result("step")
    measure = f"median of {steps} steps, batch {u.batch_size}, {target.num_layers}×{target.hidden_size} Llama"
    result.rows = [
        Row("SU vs GradDiff step time", measure, f"{median['su'] * 1e3:.1f} ms", f"{median['graddiff'] * 1e3:.1f} ms",
            f"{ratio:.3f}×", "≤ 1.05×"),
        Row("SU vs GradDiff step memory", "bytes saved for backward per step",
            f"{saved_bytes['su'] / 2**20:.2f} MiB", f"{saved_bytes['graddiff'] / 2**20:.2f} MiB",
            f"{memory_ratio:.3f}×", "≈ 1×"),
    ]
    result.ratios = {"su_vs_graddiff_step": ratio}
    for model, n, key in [(target, steps, "unlearn_vs_bare"), (big, max(4, steps // 5), "unlearn_vs_bare_big")]:
        if model is None:
            continue
        ours, bare, diff, n_steps = unlearn_vs_bare(model, n)
        size = f"{model.num_layers}×{model.hidden_size}"
        result.rows.append(Row(f"unlearn loop vs bare PyTorch loop, {size}",
                               f"steps/s, su, {n_steps} steps, embedded batches (weights within {diff:.1g} rel.)",
                               f"{ours:.2f}/s", f"{bare:.2f}/s", f"{ours / bare:.3f}×", "≥ 0.9×"))
        result.ratios[key if model is target else f"unlearn_vs_bare_{model.num_layers}x{model.hidden_size}"] = (
            ours / bare)
        result.details[key] = {"steps_per_second": ours, "bare_steps_per_second": bare, "max_rel_weight_diff": diff,
                               "steps": n_steps, "model": size}
    result.details = {"median_seconds": median, "mean_seconds": {k: float(np.mean(v)) for k, v in seconds.items()},
                      "saved_bytes": saved_bytes, "memory_ratio": memory_ratio, "cuda_peak_mb": cuda_peak,
                      "steps": steps, "batch_size": u.batch_size,
                      "model": {"hidden_size": target.hidden_size, "layers": target.num_layers}}
    return result


@dataclass
class LoopFixture:
    """What both loops of `unlearn_vs_bare` share: the config, the batches and the starting weights on disk."""

    u: UnlearnConfig
    data: Data
    target_dir: Path
    workdir: Path


def loop_fixture(workdir: Path, target: TargetConfig, steps: int, preset: str = "embedded") -> LoopFixture:
    """The preset's real forget and retain documents (SU's selection: a random quarter of each answer) and an
    untrained Llama of `target`'s size; enough epochs for `steps` optimizer steps."""
    from stages.common import load_documents
    from stages.config import load_config
    from stages.prepare import prepare
    from stages.unlearn.data import load_split
    from stages.unlearn.distributed import init_distributed

    init_distributed()
    cfg = load_config(preset)
    prepare(cfg, {}, workdir / "prepare")
    documents = load_documents(workdir / "prepare")
    forget, retain = load_split(documents, "forget"), load_split(documents, "retain")
    rng = np.random.default_rng(0)
    forget.selected = [(rng.random(len(ids)) < 0.25) & (np.arange(len(ids)) >= start)
                       for ids, start in zip(forget.input_ids, forget.answer_start, strict=True)]
    data = Data(forget, retain, None, None, pad_id=0)
    tiny_llama(target, cfg.model.vocab_size).save_pretrained(workdir / "target")
    per_epoch = math.ceil(len(forget) / cfg.unlearn.batch_size)
    u = dataclasses.replace(cfg.unlearn, epochs=math.ceil(steps / per_epoch), checkpoint_every=0)
    return LoopFixture(u, data, workdir / "target", workdir)


def sunlearn_loop(fx: LoopFixture, name: str = "su") -> tuple[float, dict[str, torch.Tensor]]:
    """(steps/s, final weights) of the unlearn stage's own loop, `train_method`, by the seconds in its stats."""
    from safetensors.torch import load_file

    out = fx.workdir / "sunlearn"
    shutil.rmtree(out, ignore_errors=True)
    _, stats = train_method(fx.u, METHODS[name], fx.data, fx.target_dir, out)
    return stats["steps"] / stats["seconds"], load_file(out / name / "model.safetensors")


def bare_loop(fx: LoopFixture, name: str = "su") -> tuple[float, dict[str, torch.Tensor]]:
    """(steps/s, final weights) of a plain PyTorch loop: both forwards, the loss, backward, clipping, AdamW."""
    u, data, spec = fx.u, fx.data, METHODS[name]
    seed_everything(u.seed)
    model = load_model(fx.target_dir)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=u.lr)
    plan = schedule(len(data.forget), len(data.retain), u.batch_size, u.epochs, u.seed)
    start = time.perf_counter()
    for _, forget_rows, retain_rows in plan:
        forget, retain = collate(data.forget, forget_rows, data.pad_id), collate(data.retain, retain_rows, data.pad_id)
        forget_logits = model(input_ids=forget.input_ids, attention_mask=forget.attention_mask).logits
        retain_logits = model(input_ids=retain.input_ids, attention_mask=retain.attention_mask).logits
        outputs = Outputs(token_logprobs(forget_logits, forget.input_ids), forget.labels(spec.selective) != -100,
                          token_logprobs(retain_logits, retain.input_ids), retain.answer_mask,
                          forget_answer_mask=forget.answer_mask)
        spec(outputs, u.alpha).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # the engine's gradient_clipping
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return len(plan) / seconds, {k: v.detach().clone() for k, v in model.state_dict().items()}


def unlearn_vs_bare(target: TargetConfig, steps: int) -> tuple[float, float, float, int]:
    """(sunlearn steps/s, bare steps/s, max relative weight difference, steps): each loop twice, interleaved, best
    of two, so that load on the machine hits both alike."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-loop-") as tmp:
        fx = loop_fixture(Path(tmp), target, steps)
        ours, bare = [], []
        for _ in range(2):
            speed, bare_weights = bare_loop(fx)
            bare.append(speed)
            speed, our_weights = sunlearn_loop(fx)
            ours.append(speed)
        diff = max(((our_weights[k] - bare_weights[k]).abs().max() / bare_weights[k].abs().max()).item()
                   for k in our_weights)
        n_steps = len(schedule(len(fx.data.forget), len(fx.data.retain), fx.u.batch_size, fx.u.epochs, fx.u.seed))
    return max(ours), max(bare), diff, n_steps
