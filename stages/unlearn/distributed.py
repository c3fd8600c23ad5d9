"""The torch.distributed environment DeepSpeed expects, set up once per process, and the torchrun launcher.

A launcher (torchrun) sets RANK/WORLD_SIZE/MASTER_*; a plain `sunlearn run` sets nothing, so we fill in a world of
one on a free port. Without these variables DeepSpeed falls back to MPI discovery.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from stages.environment import REPO, free_port


def init_distributed() -> tuple[int, int]:
    """(rank, world size) after initialising torch.distributed if this process has not yet: gloo on CPU, nccl on GPU."""
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))  # DeepSpeed's comm op
    if not torch.distributed.is_initialized():
        for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
            os.environ.setdefault(key, value)
        own_port = "MASTER_PORT" not in os.environ
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        import deepspeed

        deepspeed.utils.logger.setLevel(logging.WARNING)
        if not cuda and os.environ.get("SUNLEARN_DS_SHM_COMM") != "1":
            # DeepSpeed compiles a shared-memory allreduce op (1-2 min) on first use; gloo's allreduce serves the
            # CPU path (tests, laptops) well enough. SUNLEARN_DS_SHM_COMM=1 builds it for multi-process CPU runs.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        if own_port:  # this process listens on it now: processes it starts (flow runs, torchrun) must pick their own
            del os.environ["MASTER_PORT"]
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


UNLEARN_ENTRY = "stages.unlearn.loop:unlearn_in_process"


def launch(
    config: dict[str, Any], inputs: dict[str, Path], out: Path, num_procs: int, hostfile: str | None = None,
    entry: str = UNLEARN_ENTRY,
) -> dict[str, Any]:
    """Run `entry` (module:function of (cfg, inputs, out), the unlearn loop or the fine-tune) through
    stages.unlearn.worker in `num_procs` processes per node; returns rank 0's stats.

    One node: torchrun. Several nodes (`hostfile`, DeepSpeed's format: `host slots=N` per line): DeepSpeed's launcher,
    which starts the ranks over ssh/pdsh; the job folder then sits beside the artifact, on the shared filesystem that
    every node mounts. A worker's UnlearnDiverged comes back as the same exception here, with the worker's message.
    """
    from stages.unlearn.loop import UnlearnDiverged

    job_parent = out.parent if hostfile else None  # shared between nodes only when it is under the artifact root
    with tempfile.TemporaryDirectory(prefix=".job-unlearn-", dir=job_parent) as tmp:
        job = Path(tmp)
        (job / "config.json").write_text(json.dumps(config))
        (job / "inputs.json").write_text(json.dumps({k: str(v) for k, v in inputs.items()}))
        (job / "entry.txt").write_text(entry)
        if hostfile:
            if not Path(hostfile).is_file():
                raise FileNotFoundError(f"unlearn.hostfile {hostfile} does not exist")
            cmd = [sys.executable, "-m", "deepspeed.launcher.runner", f"--hostfile={hostfile}",
                   f"--num_gpus={num_procs}", "--module"]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_procs}", "-m"]
        cmd += ["stages.unlearn.worker", str(job), str(out)]
        own = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        env = {k: v for k, v in os.environ.items() if k not in own}  # the launcher sets these for its workers
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        code = subprocess.run(cmd, env=env, cwd=REPO).returncode
        if (job / "diverged.txt").is_file():
            raise UnlearnDiverged((job / "diverged.txt").read_text())
        if code != 0:
            launcher = f"DeepSpeed's launcher with {hostfile}" if hostfile else f"torchrun with {num_procs} processes"
            what = "unlearn" if entry == UNLEARN_ENTRY else "target fine-tune"
            raise RuntimeError(f"{what}: {launcher} exited with {code}; see its output above")
        return json.loads((job / "stats.json").read_text())
