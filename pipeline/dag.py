"""The stage table: what each stage runs, which config sections it reads, and what it depends on.

A stage's fingerprint covers exactly these: its config sections, its upstream fingerprints and the source of every
in-repository module its entry point imports (stages.code_version). Nothing else can change its output.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cache import fingerprint
from stages.code_version import code_version
from stages.config import Config


@dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str  # "module:function"; the function is fn(cfg, inputs: {upstream: Path}, out: Path) -> stats
    sections: tuple[str, ...]
    upstream: tuple[str, ...]

    @property
    def module(self) -> str:
        return self.entry.partition(":")[0]

    def function(self) -> Callable[[Config, dict[str, Path], Path], dict[str, Any] | None]:
        module, _, name = self.entry.partition(":")
        return getattr(importlib.import_module(module), name)


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("prepare", "stages.prepare:prepare", ("data", "model"), ()),
        StageSpec("target", "stages.target:train_target", ("model", "target"), ("prepare",)),
        StageSpec("assistants", "stages.assistants:train_assistants", ("assistants",), ("prepare",)),
        StageSpec("scores", "stages.scores:score_tokens", ("assistants",), ("prepare", "assistants")),
        StageSpec("masks", "stages.masks:build_masks", ("masks",), ("scores",)),
        StageSpec("unlearn", "stages.unlearn:unlearn", ("unlearn",), ("prepare", "target", "masks")),
        StageSpec("evaluate", "stages.evaluate:evaluate", ("evaluate",), ("prepare", "target", "masks", "scores",
                                                                            "unlearn")),
    ]
}

ORDER = list(STAGES)


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
            "code": code_version((spec.module,)),
        }
        out[name] = {"fingerprint": fingerprint(payload), **payload}
    return out
