"""The torch.distributed environment DeepSpeed expects, set up once per process.

A launcher (torchrun) sets RANK/WORLD_SIZE/MASTER_*; a plain `sunlearn run` sets nothing, so we fill in a world of
one on a free port. Without these variables DeepSpeed falls back to MPI discovery.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> tuple[int, int]:
    """(rank, world size) after initialising torch.distributed if this process has not yet: gloo on CPU, nccl on GPU."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))  # DeepSpeed's comm op
    if not torch.distributed.is_initialized():
        for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()
