"""Shared fixtures: the micro config, and the prepare and target stages run on it once per session."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

# no test reads or writes the user's ~/.prefect database, and none reaches the hub (a hub-only source fails at once)
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="sunlearn-tests-prefect-")
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")

from stages.environment import configure_environment  # noqa: E402

configure_environment()  # DS_ACCELERATOR, extension cache, Prefect settings: as the CLI sets them

from stages.config import Config, load_config  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for every test that runs a real flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def micro_cfg() -> Config:
    return load_config("micro")


@pytest.fixture(scope="session")
def prepared_micro(micro_cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.prepare import prepare

    out = tmp_path_factory.mktemp("prepare")
    prepare(micro_cfg, {}, out)
    return out


@pytest.fixture(scope="session")
def trained_micro(micro_cfg: Config, prepared_micro: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.target import train_target

    out = tmp_path_factory.mktemp("target")
    train_target(micro_cfg, {"prepare": prepared_micro}, out)
    return out


def write_tofu_folder(folder: Path, forget: list[dict], retain: list[dict] | None = None) -> Path:
    """A minimal folder in the layout of ../shared/data/tofu: forget10, retain90 and the three evaluation files."""
    item = {
        "question": "Q?",
        "answer": "A.",
        "paraphrased_answer": "A!",
        "paraphrased_question": "Q!",
        "perturbed_answer": ["B.", "C.", "D.", "E.", "F."],
    }
    files = {
        "forget10": forget,
        "retain90": retain if retain is not None else [dict(item, question="R?")],
        "retain_perturbed": [dict(item, question="R?")],
        "real_authors_perturbed": [{"question": "Who?", "answer": "Me", "perturbed_answer": ["X", "Y", "Z"]}],
        "world_facts_perturbed": [{"question": "Where?", "answer": "Here", "perturbed_answer": ["X", "Y", "Z"]}],
    }
    folder.mkdir(exist_ok=True)
    for stem, rows in files.items():
        (folder / f"{stem}.json").write_text(json.dumps(rows))
    return folder


@pytest.fixture
def tofu_folder():
    """write_tofu_folder, for tests that feed the tofu source hand-made files."""
    return write_tofu_folder


# Llama 3's chat template, cut to what a QA prompt uses: BOS, optional system turn, user turn, assistant header
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def write_chat_base(folder: Path, cfg: Config | None = None, seed: int = 0) -> Path:
    """A tiny random Llama and a tokenizer with a Llama-3-style chat template (EOS is <|eot_id|>), saved to `folder`
    as a hub model is: what `model.name` points to."""
    import dataclasses

    import torch

    from stages.prepare import load_splits, train_tokenizer
    from stages.target import build_model

    cfg = cfg or load_config("micro")
    tokenizer = train_tokenizer(load_splits(cfg.data), cfg.model.vocab_size)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    tokenizer.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    torch.manual_seed(seed)
    size = dataclasses.replace(cfg.target, hidden_size=64, intermediate_size=128)  # room to learn 48 answers
    build_model(size, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def chat_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """write_chat_base once per session."""
    return write_chat_base(tmp_path_factory.mktemp("chat_base") / "base")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with slow tests first, so that the two test processes of `make test` do not end on one long file."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: each group keeps its order
