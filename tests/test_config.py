"""Run configuration: presets, typed overrides and one-line errors."""

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.stages import ORDER, downstream, fingerprints


def test_overrides_are_typed():
    cfg = load_config("micro", overrides=["masks.gamma=0.7", "unlearn.methods=su,ga", "data.limit=5"])
    assert cfg.masks.gamma == 0.7
    assert cfg.unlearn.methods == ["su", "ga"]
    assert cfg.data.limit == 5
    assert load_config(overrides=["masks.gamma=auto"]).masks.gamma == "auto"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["unlearn.lrr=1e-5"], "unknown config key 'unlearn.lrr' (did you mean 'unlearn.lr'?)"),
        (["masks.gamma=1.5"], "masks.gamma must be in [0, 1]"),
        (["masks.window=-1"], "masks.window must be >= 0"),
        (["unlearn.methods=gradif"], "unknown method 'gradif' (did you mean 'graddiff'?)"),
        (["target.epochs=many"], "target.epochs: expected int, got 'many'"),
        (["unlearn.hostfile=/nonexistent/hostfile"], "unlearn.hostfile /nonexistent/hostfile does not exist"),
    ],
)
def test_bad_values_give_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("micro", overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'micro'"):
        load_config("mikro")


def test_gamma_changes_only_masks_and_downstream_fingerprints():
    a = fingerprints(load_config("micro"))
    b = fingerprints(load_config("micro", overrides=["masks.gamma=0.3"]))
    changed = [s for s in ORDER if a[s]["fingerprint"] != b[s]["fingerprint"]]
    assert changed == ["masks", "unlearn", "evaluate"]
    assert downstream("masks") == ["masks", "unlearn", "evaluate"]
