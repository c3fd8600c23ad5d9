"""The stage table: what each stage runs, which config sections it reads, and what it depends on.

A stage's fingerprint covers exactly these: its config sections, its upstream fingerprints and the source of the
modules that compute it. Nothing else can change its output.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from pipeline.cache import fingerprint
from stages.config import Config

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str  # "module:function"; the function is fn(cfg, inputs: {upstream: Path}, out: Path) -> stats
    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    code: tuple[str, ...]  # modules (or packages) whose source is part of the fingerprint

    def function(self) -> Callable[[Config, dict[str, Path], Path], dict[str, Any] | None]:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)


_SHARED = ("stages.common", "schemas")

STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("prepare", "stages.prepare:prepare", ("data", "model"), (), ("stages.prepare", "data")),
        StageSpec("target", "stages.target:train_target", ("model", "target"), ("prepare",), ("stages.target",)),
        StageSpec(
            "assistants",
            "stages.assistants:train_assistants",
            ("assistants",),
            ("prepare",),
            ("stages.assistants", "stages.llm_assistants", "stages.target"),
        ),
        StageSpec(
            "scores",
            "stages.scores:score_tokens",
            ("assistants",),
            ("prepare", "assistants"),
            ("stages.scores", "stages.llm_assistants"),
        ),
        StageSpec("masks", "stages.masks:build_masks", ("masks",), ("scores",), ("stages.masks",)),
        StageSpec(
            "unlearn", "stages.unlearn:unlearn", ("unlearn",), ("prepare", "target", "masks"), ("stages.unlearn",)
        ),
        StageSpec(
            "evaluate",
            "stages.evaluate:evaluate",
            ("evaluate",),
            ("prepare", "target", "masks", "scores", "unlearn"),
            ("stages.evaluate", "stages.metrics", "stages.scoring", "stages.reports"),
        ),
    ]
}

ORDER = list(STAGES)


@cache
def code_version(modules: tuple[str, ...]) -> str:
    """Hash of the source files of the given modules or packages."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"cannot find module {name}")
        origin = Path(spec.origin)
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for path in files:
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def downstream(stage: str) -> list[str]:
    """The stage and every stage that depends on it, in run order."""
    hit = {stage}
    for name in ORDER:
        if hit & set(STAGES[name].upstream):
            hit.add(name)
    return [n for n in ORDER if n in hit]


def upstream_closure(stage: str) -> list[str]:
    """The stage and everything it needs, in run order."""
    need = {stage}
    for name in reversed(ORDER):
        if name in need:
            need.update(STAGES[name].upstream)
    return [n for n in ORDER if n in need]


def fingerprints(cfg: Config) -> dict[str, dict[str, Any]]:
    """Per stage: its fingerprint and the payload it was computed from."""
    out: dict[str, dict[str, Any]] = {}
    for name in ORDER:
        spec = STAGES[name]
        payload = {
            "stage": name,
            "config": {s: cfg.section(s) for s in spec.sections},
            "upstream": {u: out[u]["fingerprint"] for u in spec.upstream},
            "code": code_version(spec.code + _SHARED),
        }
        out[name] = {"fingerprint": fingerprint(payload), **payload}
    return out
