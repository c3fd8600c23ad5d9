"""Train the two assistant language models that SU compares.

KenLM assistants are 5-gram models trained with the real `lmplz` over the target tokenizer's token ids, one
"word" per id, so every LLM token gets exactly one n-gram score. Assistant A sees the full split (forget + retain);
assistant B sees retain (`full_retain`, the default) or forget (`full_forget`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from stages.common import kenlm_sentences, load_documents, log
from stages.config import Config

ASSISTANT_SPLITS = {
    "full_retain": (("forget", "retain"), ("retain",)),
    "full_forget": (("forget", "retain"), ("forget",)),
}


REPO_KENLM_BIN = Path(__file__).resolve().parents[1] / ".kenlm" / "bin"  # where `make setup` builds them


class KenLMError(RuntimeError):
    """lmplz or build_binary missing or failing."""


def kenlm_tool(name: str) -> str:
    """Path of a KenLM binary: $SUNLEARN_KENLM_BIN, the repo's .kenlm/bin, then PATH."""
    candidates = [os.environ.get("SUNLEARN_KENLM_BIN"), str(REPO_KENLM_BIN)]
    for folder in filter(None, candidates):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise KenLMError(f"{name} not found (run `make setup` to build KenLM, or set SUNLEARN_KENLM_BIN)")
    return found


def write_corpus(prepare_dir: Path, splits: tuple[str, ...], path: Path) -> int:
    """One line per document: its token ids separated by spaces. Returns the number of tokens."""
    docs = load_documents(prepare_dir, splits)
    path.write_text("\n".join(kenlm_sentences(docs)) + "\n")
    return int(pc.sum(pc.list_value_length(docs["input_ids"])).as_py() or 0)


def _run(cmd: list[str], tool: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise KenLMError(f"{tool} failed (exit {proc.returncode}): {tail}")
    return proc


def train_kenlm(corpus: Path, binary: Path, order: int, memory: str, workdir: Path) -> dict[str, Any]:
    """lmplz, then build_binary. Retries with --discount_fallback only when lmplz asks for it."""
    arpa = workdir / f"{binary.stem}.arpa"
    base = [kenlm_tool("lmplz"), "-o", str(order), "-S", memory, "-T", str(workdir), "--text", str(corpus),
            "--arpa", str(arpa)]
    proc = subprocess.run(base, capture_output=True, text=True)
    fallback = proc.returncode != 0 and "discount_fallback" in proc.stderr
    if fallback:
        log.info("lmplz: corpus too small for Kneser-Ney discount estimates, using --discount_fallback")
        proc = _run([*base, "--discount_fallback"], "lmplz")
    elif proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise KenLMError(f"lmplz failed (exit {proc.returncode}): {tail}")
    _run([kenlm_tool("build_binary"), "-S", memory, "-T", str(workdir), str(arpa), str(binary)], "build_binary")
    arpa_bytes = arpa.stat().st_size
    arpa.unlink()
    return {"discount_fallback": fallback, "arpa_bytes": arpa_bytes, "binary_bytes": binary.stat().st_size}


def train_assistants(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    if cfg.assistants.kind == "llm":
        from stages.llm_assistants import train_llm_assistants

        return train_llm_assistants(cfg, inputs, out)
    split_a, split_b = ASSISTANT_SPLITS[cfg.assistants.splits]
    work = out / ".work"
    work.mkdir()
    stats: dict[str, Any] = {"kind": "kenlm", "splits": cfg.assistants.splits, "order": cfg.assistants.order}
    for name, splits in (("a", split_a), ("b", split_b)):
        corpus = work / f"{name}.txt"
        tokens = write_corpus(inputs["prepare"], splits, corpus)
        log.info("assistant %s: lmplz order %d on %s (%d tokens)", name, cfg.assistants.order, "+".join(splits), tokens)
        stats[name] = {"splits": list(splits), "tokens": tokens,
                       **train_kenlm(corpus, out / f"{name}.binary", cfg.assistants.order, cfg.assistants.memory, work)}
    shutil.rmtree(work)
    return stats
