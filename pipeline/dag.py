"""The stage table: what each stage runs, which config sections it reads, and what it depends on.

A stage's fingerprint covers exactly these: its config sections, its upstream fingerprints and the source of every
in-repository module its entry point imports (stages.code_version); prepare's also covers its inputs (a content hash
of every file it reads, the commit of every hub dataset: stages.inputs). Nothing else can change an output.

A stage that reads only prepare's tokenizer (`reads_tokenizer_only`: the target stage with a pretrained model and no
target.finetune, which copies the model and its tokenizer) depends on prepare through what decides that tokenizer,
the model config and prepare's code, not through the documents: a new forget request does not copy a hub model again.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cache import content_hashes, fingerprint
from stages.code_version import code_version
from stages.config import Config
from stages.inputs import hub_datasets, input_files


@dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str  # "module:function"; the function is fn(cfg, inputs: {upstream: Path}, out: Path) -> stats
    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    # with this config, the stage reads nothing of prepare's output but the tokenizer
    reads_tokenizer_only: Callable[[Config], bool] = lambda cfg: False
    # another entry for some configs, so the fingerprint covers only the code that config runs
    entry_for: Callable[[Config], str | None] = lambda cfg: None
    # libraries the stage imports inside its functions: a worker waiting on another's lock loads them meanwhile
    preload: tuple[str, ...] = ()

    def module(self, cfg: Config) -> str:
        return (self.entry_for(cfg) or self.entry).partition(":")[0]

    def function(self, cfg: Config) -> Callable[[Config, dict[str, Path], Path], dict[str, Any] | None]:
        module, _, name = (self.entry_for(cfg) or self.entry).partition(":")
        return getattr(importlib.import_module(module), name)


LLAMA = "transformers.models.llama.modeling_llama"

STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("prepare", "stages.prepare:prepare", ("data", "model"), ()),
        StageSpec("target", "stages.target:train_target", ("model", "target"), ("prepare",), preload=(LLAMA,),
                  reads_tokenizer_only=lambda cfg: cfg.model.name is not None and not cfg.target.finetune,
                  # fine-tuning a base runs in unlearn's DeepSpeed engine and launcher; training from scratch does not
                  entry_for=lambda cfg: "stages.finetune:finetune" if cfg.model.name and cfg.target.finetune else None),
        StageSpec("assistants", "stages.assistants:train_assistants", ("assistants",), ("prepare",)),
        StageSpec("scores", "stages.scores:score_tokens", ("assistants",), ("prepare", "assistants")),
        StageSpec("masks", "stages.masks:build_masks", ("masks",), ("scores",)),
        StageSpec("unlearn", "stages.unlearn:unlearn", ("unlearn",), ("prepare", "target", "masks"),
                  preload=(LLAMA, "deepspeed")),
        StageSpec("evaluate", "stages.evaluate:evaluate", ("evaluate",), ("prepare", "target", "masks", "scores",
                                                                            "unlearn"), preload=(LLAMA,)),
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


def prepare_inputs(cfg: Config) -> dict[str, Any]:
    """What prepare reads from outside: {"files": {path: sha256}, "hub": {dataset id: commit}}."""
    return {"files": content_hashes(input_files(cfg.data)), "hub": dict(hub_datasets(cfg.data))}


def fingerprints(cfg: Config) -> dict[str, dict[str, Any]]:
    """Per stage: its fingerprint and the payload it was computed from."""
    out: dict[str, dict[str, Any]] = {}
    for name in ORDER:
        spec = STAGES[name]
        upstream: dict[str, Any] = {u: out[u]["fingerprint"] for u in spec.upstream}
        if "prepare" in upstream and spec.reads_tokenizer_only(cfg):
            upstream["prepare"] = {"tokenizer": cfg.section("model"), "code": code_version(("stages.prepare",))}
        payload = {
            "stage": name,
            "config": {s: cfg.section(s) for s in spec.sections},
            "upstream": upstream,
            "code": code_version((spec.module(cfg),)),
        }
        if name == "prepare":
            payload["inputs"] = prepare_inputs(cfg)
        out[name] = {"fingerprint": fingerprint(payload), **payload}
    return out
