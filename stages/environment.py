"""Process-wide set-up shared by every layer: the repository root, environment defaults (set before Prefect, torch or
DeepSpeed are imported) and a free port."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def configure_environment() -> None:
    defaults = {
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # the temporary server of a run without PREFECT_API_URL can take long to start on a busy 2-core machine
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOGGING_EXTRA_LOGGERS": "sunlearn",
        "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions"),
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    # Prefect attaches its console and API handlers to this logger (PREFECT_LOGGING_EXTRA_LOGGERS)
    logging.getLogger("sunlearn").setLevel(logging.INFO)
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads())


def cpu_threads() -> int:
    """Half the cores, at most 4: the project's models are small, and with every core busy a thread that shares a
    core with another process stalls the rest (measured here: 1 thread 0.14 s per training step, 2 threads 0.63 s)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
