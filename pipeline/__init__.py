"""Orchestration: run config, artifact cache, Prefect flows and the `sunlearn` CLI."""
