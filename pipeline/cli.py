"""The `sunlearn` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from stages.environment import configure_environment

configure_environment()

from pipeline.dag import ORDER  # noqa: E402
from pipeline.serve import cmd_serve  # noqa: E402
from stages.config import PRESETS, ConfigError, load_config, suggest  # noqa: E402

log = logging.getLogger("sunlearn")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="embedded", help=f"one of {', '.join(PRESETS)} (default: embedded)")
    parser.add_argument("--config", dest="config_file", help="YAML or JSON file of config keys")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. masks.gamma=0.6 (repeatable)")
    parser.add_argument("--artifacts", default="artifacts", help="artifact root (default: ./artifacts)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sunlearn", description="Selective Unlearning pipeline")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline (cached stages are reused)")
    _config_args(run)
    run.add_argument("--force", metavar="STAGE", help="recompute STAGE and everything downstream of it")
    run.add_argument("--json", action="store_true", help="print one JSON object (stages and metrics) on stdout")

    stage = sub.add_parser("stage", help="run one stage, computing only the upstream stages that are missing")
    stage.add_argument("name", help=" | ".join(ORDER))
    _config_args(stage)
    stage.add_argument("--if-missing", action="store_true", help="reuse the stage's artifact when it is cached")
    stage.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    status = sub.add_parser("status", help="show each stage's cache state for a config")
    _config_args(status)
    status.add_argument("--json", action="store_true")

    sweep = sub.add_parser("sweep", help="run a grid of config values as one flow and collect one metrics table")
    _config_args(sweep)
    sweep.add_argument("--grid", action="append", required=True, metavar="KEY=V1,V2,...",
                       help="a config key and the values to try (repeatable; the grid is their product)")
    sweep.add_argument("--seeds-key", default="unlearn.seed", help="grid key averaged over in the summary")
    sweep.add_argument("--parallel", type=int, default=1, metavar="N",
                       help="grid points at once: local worker processes, or flow runs in flight on a server")
    sweep.add_argument("--via-deployment", action="store_true",
                       help="each point a flow run of the pipeline deployment (default when PREFECT_API_URL is set)")
    sweep.add_argument("--json", action="store_true")

    study = sub.add_parser("study", help="run a study file (studies/NAME.yaml) and write docs/results/NAME.md")
    study.add_argument("files", nargs="*", metavar="FILE", help="study files (with --check, default: studies/*.yaml)")
    study.add_argument("--check", action="store_true",
                       help="recompute the fingerprints of every run on each page, run nothing; exit 1 if stale")
    study.add_argument("--artifacts", default="artifacts", help="artifact root (default: ./artifacts)")

    sub.add_parser("methods", help="list the registered unlearning methods with their parameters")

    verify = sub.add_parser("verify", help="check every cached artifact against its manifest's checksums")
    verify.add_argument("--artifacts", default="artifacts", help="artifact root (default: ./artifacts)")
    verify.add_argument("--fix", action="store_true", help="remove corrupt or incomplete entries, stale temp folders")
    verify.add_argument("--json", action="store_true")

    report = sub.add_parser("report", help="rebuild results.md, pareto.png (every run under the root), selection.html")
    _config_args(report)

    serve = sub.add_parser("serve", help="local Prefect server + work pool + deployments + worker, until Ctrl-C")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address the server listens on (default: 127.0.0.1; any other needs --auth)")
    serve.add_argument("--auth", action="store_true",
                       help="require the auth string kept in HOME/auth_string (created mode 0600) from every client")
    serve.add_argument("--port", type=int, default=4200, help="server port; 0 picks a free one (default: 4200)")
    serve.add_argument("--db", default="sqlite", help="sqlite | postgres (a local cluster) | postgresql+asyncpg://...")
    serve.add_argument("--artifacts", default="artifacts", help="artifact root the deployments use")
    serve.add_argument("--home", help="PREFECT_HOME of the server: database, logs (default: .cache/prefect)")
    serve.add_argument("--workers", type=int, default=1,
                       help="process workers to start; more than one take one flow run each at a time (default: 1)")
    return parser


def _check_stage(name: str | None) -> None:
    if name is not None and name not in ORDER:
        raise ConfigError(f"unknown stage {name!r}{suggest(name, ORDER)}")


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        keep = ("name", "status", "seconds", "path")
        print(json.dumps({"stages": [{k: s[k] for k in keep} for s in summary["stages"]],
                          "metrics": summary["metrics"]}))
        return
    print()
    for s in summary["stages"]:
        print(f"  {s['name']:<11} {s['status']:<7} {s['seconds']:>8.1f}s  {s['path']}")
        if s["name"] == "unlearn" and s["status"] == "ran":
            methods = {m: v for m, v in s["stats"].items() if isinstance(v, dict)}
            trained = [m for m, v in methods.items() if not v.get("reused")] or ["none"]
            reused = [m for m, v in methods.items() if v.get("reused")] or ["none"]
            print(f"  {'':<11} trained {', '.join(trained)}; reused {', '.join(reused)} (same settings, earlier run)")
    if summary["metrics"]:
        import pyarrow as pa

        from stages.reports import format_table

        print()
        print(format_table(pa.Table.from_pylist(summary["metrics"])))


def cmd_run(args: argparse.Namespace) -> None:
    _check_stage(args.force)
    load_config(args.preset, args.config_file, args.overrides)  # fail fast, before Prefect starts
    from pipeline.flows import pipeline_flow

    _console_without_tracebacks(args.debug)
    summary = pipeline_flow(preset=args.preset, overrides=args.overrides, artifacts=args.artifacts,
                            force=args.force, config_file=args.config_file)
    _print_summary(summary, args.json)


def cmd_stage(args: argparse.Namespace) -> None:
    _check_stage(args.name)
    load_config(args.preset, args.config_file, args.overrides)
    from pipeline.flows import stage_flow

    _console_without_tracebacks(args.debug)
    summary = stage_flow(stage=args.name, preset=args.preset, overrides=args.overrides, artifacts=args.artifacts,
                         force=not args.if_missing, config_file=args.config_file)
    _print_summary(summary, args.json)


def cmd_status(args: argparse.Namespace) -> None:
    from pipeline import storage
    from pipeline.dag import fingerprints

    cfg = load_config(args.preset, args.config_file, args.overrides)
    cache = storage.local_cache(args.artifacts)
    rows = []
    for name, fp in fingerprints(cfg).items():
        entry = cache.entry(name, fp["fingerprint"])
        state = "cached" if entry.is_complete() else "incomplete" if entry.path.exists() else "missing"
        rows.append({"name": name, "state": state, "fingerprint": fp["fingerprint"], "path": str(entry.path)})
    if args.json:
        print(json.dumps({"stages": rows}))
        return
    for row in rows:
        print(f"  {row['name']:<11} {row['state']:<10} {row['fingerprint']}  {row['path']}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.sweep import grid_points, parse_grid, server_configured, summary_table, sweep_flow

    for point in grid_points(parse_grid(args.grid)):  # fail fast on any bad grid value
        load_config(args.preset, args.config_file, [*args.overrides, *(f"{k}={v}" for k, v in point.items())])
    _console_without_tracebacks(args.debug)
    result = sweep_flow(grid=args.grid, preset=args.preset, overrides=args.overrides, artifacts=args.artifacts,
                        seeds_key=args.seeds_key, config_file=args.config_file, parallel=args.parallel,
                        via_deployment=args.via_deployment or server_configured())
    if args.json:
        print(json.dumps({"path": result["path"], "summary": result["summary"], "failed": result["failed"]}))
    else:
        print(summary_table(result["summary"]))
        for f in result["failed"]:
            print(f"failed point {f['point']}: {f['error']}")
        print(f"\nsweep results: {result['path']}")
    return 1 if result["failed"] else 0


def cmd_study(args: argparse.Namespace) -> int:
    from pipeline.study import check_study, load_study, run_study, study_files

    files = study_files(args.files)
    if not files:
        raise ConfigError("no study files given and none in studies/")
    if args.check:
        stale = [problem for path in files for problem in check_study(path)]
        for problem in stale:
            print(f"  stale: {problem}")
        print(f"{len(files) - len({p.split(':')[0] for p in stale})} of {len(files)} studies current")
        return 1 if stale else 0
    studies = [load_study(path) for path in files]  # every file and point checked before anything runs
    _console_without_tracebacks(args.debug)
    for study in studies:
        print(run_study(study, args.artifacts))
    return 0


def cmd_methods(args: argparse.Namespace) -> None:
    from stages.unlearn import METHODS

    for spec in METHODS.values():
        params = ", ".join(f"{k}={v}" for k, v in spec.params.items()) or "-"
        needs = ", ".join(filter(None, ["selective mask" if spec.selective else "",
                                        f"reference log-probs ({'+'.join(spec.reference)})" if spec.reference else ""]))
        print(f"  {spec.name:<9} {params:<32} {needs}")
    print("\n  set a parameter with --set unlearn.params.<method>.<param>=VALUE (e.g. unlearn.params.npo.beta=0.2)")
    print("  every method also takes unlearn.alpha (retain-loss weight), unlearn.lr and unlearn.epochs")
    print("  reference values come from ref_logprobs.parquet; unlearn.reference=model keeps the frozen model instead")


def cmd_verify(args: argparse.Namespace) -> int:
    from pipeline import storage

    report = storage.verify(args.artifacts, ORDER, fix=args.fix)
    bad = [r for r in report if not r["ok"]]
    if args.json:
        print(json.dumps({"entries": report}))
    else:
        for r in bad:
            action = "removed" if r["removed"] else "corrupt"
            print(f"  {action}: {r['stage']}/{r['fingerprint']}: {r['problems'][0]}")
        removed = f", {len(bad)} removed" if args.fix and bad else ""
        print(f"{len(report) - len(bad)} of {len(report)} artifacts verified{removed}")
    return 1 if bad and not args.fix else 0


def cmd_report(args: argparse.Namespace) -> None:
    from pipeline.runner import build_reports

    for location in build_reports(load_config(args.preset, args.config_file, args.overrides), args.artifacts):
        print(location)


COMMANDS = {"run": cmd_run, "stage": cmd_stage, "status": cmd_status, "serve": cmd_serve, "sweep": cmd_sweep,
            "study": cmd_study, "methods": cmd_methods, "verify": cmd_verify, "report": cmd_report}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("sunlearn: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure is one line unless --debug
        if args.debug:
            raise
        print(f"sunlearn: error: {_one_line(exc)}", file=sys.stderr)
        logging.getLogger("prefect").setLevel(logging.WARNING)  # keep the error last: no server shutdown line
        return 2 if isinstance(exc, ConfigError) else 1
    return code or 0


def _console_without_tracebacks(debug: bool) -> None:
    """Without --debug, Prefect's console records of a failed task lose their traceback: main prints one line.

    Call after Prefect set up logging. The flow-run log in the API keeps the traceback: its handler runs first.
    """
    if not debug:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_drop_traceback)


def _drop_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
