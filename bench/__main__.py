"""`python -m bench [NAME ...] [--quick]`: run the benchmarks, print their table, write bench/results.json."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

from bench.report import Result, machine, main_table, write_results  # noqa: E402
from stages.config import TargetConfig  # noqa: E402

BENCHES = ("scoring", "masks", "step", "eval", "memory", "cache", "sweep_parallel", "sweep_points", "scaling",
           "footprint", "profile")
RESULTS = Path(__file__).resolve().parent / "results.json"


@dataclass(frozen=True)
class Sizes:
    compare: tuple[int, ...]  # scoring and masks
    scaling: tuple[int, ...]  # scaling and footprint
    llm_tokens: int
    profile: int
    steps: int
    step_model: TargetConfig
    memory_model: TargetConfig  # big enough that its weights, not the runtime, dominate the peak
    cache_overrides: tuple[str, ...]
    eval_preset: str  # snapshot_eval's data and target
    eval_overrides: tuple[str, ...]
    big_step_model: TargetConfig | None  # unlearn_vs_bare at a second, larger size
    sweep_points: int = 4  # sweep_parallel's grid points
    sweep_pairs: int = 3  # sweep_parallel's (1 worker, 2 workers) pairs, alternated; the median ratio counts
    points_preset: str = "embedded"  # sweep_points: points that train and evaluate a real model, upstream cached


FULL = Sizes((1_000_000, 10_000_000), (100_000, 1_000_000, 10_000_000), 50_000, 1_000_000, 40, TargetConfig(),
             TargetConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048), (),
             "tofu", ("target.epochs=5",),  # a tiny target on TOFU forget10
             TargetConfig(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048))
# a smoke run: every benchmark at toy size; its figures say nothing about speed
QUICK = Sizes((10_000, 30_000), (10_000, 30_000), 2_000, 10_000, 3,
              TargetConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
              TargetConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
              ("data.n_authors=4", "target.epochs=1", "unlearn.methods=su,graddiff", "evaluate.max_new_tokens=2",
               "evaluate.retain_eval_items=4"), "micro", ("evaluate.max_new_tokens=4",), None, sweep_points=2,
              sweep_pairs=1, points_preset="micro")


def run_bench(name: str, sizes: Sizes, runs, overrides: tuple[str, ...] = (), artifacts: str | None = None) -> Result:
    if name == "scoring":
        from bench import scoring

        return scoring.run(runs, list(sizes.compare), sizes.llm_tokens)
    if name == "masks":
        from bench import masks

        return masks.run(runs, list(sizes.compare))
    if name == "step":
        from bench import step_cost

        return step_cost.run(sizes.steps, sizes.step_model, sizes.big_step_model)
    if name == "eval":
        from bench import bench_eval

        return bench_eval.run(sizes.eval_preset, [*sizes.eval_overrides, *overrides], artifacts)
    if name == "memory":
        from bench import memory

        return memory.run(sizes.memory_model)
    if name == "cache":
        from bench import cache

        return cache.run("micro", list(sizes.cache_overrides))
    if name == "sweep_parallel":
        from bench import sweep_parallel

        return sweep_parallel.run("micro", list(sizes.cache_overrides), sizes.sweep_points, sizes.sweep_pairs)
    if name == "sweep_points":
        from bench import sweep_parallel

        overrides = list(sizes.cache_overrides) if sizes.points_preset == "micro" else []
        return sweep_parallel.run(sizes.points_preset, overrides, sizes.sweep_points, 1, upstream_cached=True)
    if name == "scaling":
        from bench import scaling

        return scaling.run(runs, list(sizes.scaling))
    if name == "footprint":
        from bench import footprint

        return footprint.run(runs, list(sizes.scaling))
    from bench import profiles

    return profiles.run(runs, sizes.profile)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"some of: {', '.join(BENCHES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="toy sizes: a smoke test, not a measurement")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default: {RESULTS})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="eval: a config override after the bench's own (data.path=../shared/data/tofu where "
                             "there is no hub)")
    parser.add_argument("--artifacts", help="eval: take prepare and target through the pipeline cache at this root, "
                                            "reusing a target trained there")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    names = [n for n in BENCHES if n in args.names] if args.names else list(BENCHES)

    import torch

    from bench.sized import SizedRuns

    if "OMP_NUM_THREADS" not in os.environ:  # the target stage's policy for tiny models: half the cores
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // 2))
    sizes = QUICK if args.quick else FULL
    start = time.perf_counter()
    results: list[Result] = []
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="sunlearn-bench-") as tmp:
        runs = SizedRuns(Path(tmp))
        for name in names:
            began = time.perf_counter()
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            try:
                results.append(run_bench(name, sizes, runs, tuple(args.overrides), args.artifacts))
            except Exception as exc:  # one broken benchmark must not lose the others' figures
                failed[name] = f"{type(exc).__name__}: {exc}"
                print(f"bench: {name} FAILED: {failed[name]}", file=sys.stderr, flush=True)
            seconds[name] = time.perf_counter() - began
            print(f"bench: {name} done in {seconds[name]:.0f} s", file=sys.stderr, flush=True)
    total = time.perf_counter() - start

    info = machine()
    table = main_table([r for r in results if r.rows])
    extras = [t for r in results for t in r.extra_tables]
    print(f"\nsunlearn benchmarks, {info['date']}, {info['cores']} cores ({info['cpu']}), "
          f"{info['memory_gib']} GiB{' (QUICK: toy sizes)' if args.quick else ''}; total {total:.0f} s\n")
    print("\n\n".join([table, *extras]) if table else "\n\n".join(extras))
    ratios = {k: v for r in results for k, v in r.ratios.items()}
    print("\nratios: " + ", ".join(f"{k}={v:.3g}" for k, v in ratios.items()))
    write_results(args.out, {
        "machine": info, "quick": args.quick, "total_seconds": total, "bench_seconds": seconds, "ratios": ratios,
        "table": table, "extra_tables": extras, "benches": {r.name: r.details for r in results}, "failed": failed,
    })
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
