"""One process of a multi-process run: `python -m torch.distributed.run ... -m stages.unlearn.worker JOB OUT`.

JOB holds config.json, inputs.json and entry.txt (module:function, the unlearn loop or the fine-tune) written by
distributed.launch; rank 0 writes stats.json (or diverged.txt) back.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from stages.config import config_from_dict
from stages.unlearn.loop import UnlearnDiverged


def main(job: Path, out: Path) -> None:
    import torch

    tree = json.loads((job / "config.json").read_text())
    tree["unlearn"]["hostfile"] = None  # the launcher has read it; a remote node need not hold the file
    cfg = config_from_dict(tree)
    inputs = {k: Path(v) for k, v in json.loads((job / "inputs.json").read_text()).items()}
    module, _, function = (job / "entry.txt").read_text().partition(":")
    run = getattr(importlib.import_module(module), function)
    try:
        stats = run(cfg, inputs, out)
    except UnlearnDiverged as exc:  # every rank takes the same decision; one reports it
        if torch.distributed.get_rank() == 0:
            (job / "diverged.txt").write_text(str(exc))
        sys.exit(1)
    if torch.distributed.get_rank() == 0:
        (job / "stats.json").write_text(json.dumps(stats))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
