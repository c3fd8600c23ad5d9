"""Stage fingerprints cover the code each stage imports, found from the imports: edit a deep dependency in a copy of
the repository and exactly the stages that import it get new fingerprints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from stages.code_version import REPO, module_closure

FINGERPRINTS = (
    "import json; from pipeline.dag import fingerprints; from stages.config import load_config; "
    "print(json.dumps({k: v['fingerprint'] for k, v in fingerprints(load_config('micro')).items()}))"
)


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "repo"
    for name in ("stages", "schemas", "data", "pipeline"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def _fingerprints(root: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", FINGERPRINTS], cwd=root, env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_editing_a_deep_dependency_changes_exactly_the_stages_that_import_it(tmp_path):
    copy = _copy(tmp_path)
    before = _fingerprints(copy)
    with open(copy / "stages" / "scoring.py", "a") as fh:
        fh.write("\n# an edit\n")
    after = _fingerprints(copy)
    changed = {stage for stage in before if before[stage] != after[stage]}
    # unlearn's early stop scores with stages.scoring, evaluate scores and generates with it; no other stage uses it
    assert changed == {"unlearn", "evaluate"}


def test_editing_a_module_no_stage_imports_changes_nothing(tmp_path):
    copy = _copy(tmp_path)
    before = _fingerprints(copy)
    with open(copy / "pipeline" / "cli.py", "a") as fh:
        fh.write("\n# an edit\n")
    assert _fingerprints(copy) == before


def test_closure_follows_imports_inside_functions():
    closure = module_closure(["stages.assistants"])
    assert "stages.llm_assistants" in closure  # imported only inside train_assistants, for assistants.kind=llm
    assert not any(name.startswith("pipeline") for name in closure)
    assert "stages.config" not in closure  # its values are fingerprinted as config sections instead
