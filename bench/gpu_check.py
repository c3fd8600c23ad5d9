"""The unlearn step on one GPU: su and graddiff on a ~100M-parameter Llama, bf16, under ZeRO-2 then ZeRO-3.

Each (ZeRO stage, method) gets a fresh DeepSpeed engine from the same seed and runs the unlearn loop's own step
(`stages.unlearn.loop.step_outputs`, the method's loss, backward, optimizer step) on synthetic batches. It prints the
median step time, tokens/s and the CUDA peak, and checks that the weights changed. `--tiny` runs the same logic on
a toy model (on CPU when there is no GPU): a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HUNDRED_M = {"hidden_size": 768, "num_layers": 12, "num_heads": 12, "intermediate_size": 2048, "vocab": 32000}
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "vocab": 1024}


def build_engine(zero: int, bf16: bool, shape: dict, lr: float):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from stages.config import UnlearnConfig
    from stages.unlearn.loop import deepspeed_config

    u = UnlearnConfig(zero_stage=zero, bf16=bf16, lr=lr)
    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden_size"],
                         num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
                         num_key_value_heads=shape["num_heads"], intermediate_size=shape["intermediate_size"],
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=u.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(u, 1))
    return engine, u, params


def probe(engine) -> torch.Tensor:
    """A copy of one weight matrix, gathered whole under ZeRO-3."""
    import deepspeed

    weight = engine.module.model.layers[0].mlp.down_proj.weight
    with deepspeed.zero.GatheredParameters([weight], enabled=hasattr(weight, "ds_id")):
        return weight.detach().float().cpu().clone()


def check(zero: int, method: str, shape: dict, steps: int, warmup: int) -> dict:
    from bench.step_cost import synthetic_split
    from stages.unlearn.data import schedule
    from stages.unlearn.loop import Data, step_outputs
    from stages.unlearn.methods import METHODS

    cuda = torch.cuda.is_available()
    engine, u, params = build_engine(zero, cuda, shape, lr=1e-4)
    rng = np.random.default_rng(0)
    data = Data(synthetic_split(rng, 64, 0.25), synthetic_split(rng, 64, None), None, None, pad_id=0)
    plan = schedule(len(data.forget), len(data.retain), u.batch_size, (steps + warmup) // 8 + 2, u.seed)
    before = probe(engine)
    spec = METHODS[method]
    seconds, tokens = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i, (_, forget_rows, retain_rows) in enumerate(plan[: steps + warmup]):
        start = time.perf_counter()
        outputs, _, _ = step_outputs(engine, spec, data, forget_rows, retain_rows)
        loss = spec(outputs, u.alpha)
        engine.backward(loss)
        engine.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            seconds.append(time.perf_counter() - start)
            tokens.append(sum(len(data.forget.input_ids[r]) for r in forget_rows)
                          + sum(len(data.retain.input_ids[r]) for r in retain_rows))
    after = probe(engine)
    engine.destroy()
    step = float(np.median(seconds))
    return {"zero": zero, "method": method, "params_m": round(params / 1e6, 1), "bf16": cuda, "steps": len(seconds),
            "step_ms": round(step * 1e3, 2), "tokens_per_s": round(float(np.mean(tokens)) / step, 1),
            "peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "weights_changed": bool((after - before).abs().max() > 0), "final_loss": float(loss)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="a toy model: checks the script, measures nothing")
    args = parser.parse_args(argv)
    from stages.unlearn.distributed import init_distributed

    init_distributed()
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device "
          f"{torch.cuda.get_device_name(0) if cuda else 'cpu'}", flush=True)
    shape = TINY if args.tiny else HUNDRED_M
    rows = []
    for zero in (2, 3):
        for method in ("su", "graddiff"):
            row = check(zero, method, shape, args.steps, warmup=3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'zero':>4} {'method':<9} {'params':>7} {'step ms':>9} {'tokens/s':>10} {'peak MiB':>9} changed")
    for r in rows:
        print(f"{r['zero']:>4} {r['method']:<9} {r['params_m']:>6}M {r['step_ms']:>9} {r['tokens_per_s']:>10} "
              f"{r['peak_mib'] if r['peak_mib'] is not None else '-':>9} {r['weights_changed']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps({"cuda": cuda, "tiny": args.tiny, "rows": rows}, indent=1))
    failed = [r for r in rows if not r["weights_changed"]]
    for r in failed:
        print(f"FAILED: ZeRO-{r['zero']} {r['method']}: the weights did not change", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
