"""Run configuration: presets, typed overrides and one-line errors."""

import pytest

from pipeline.dag import ORDER, downstream, fingerprints
from stages.config import ConfigError, load_config, validate


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
        (["unlearn.params.npoo.beta=0.2"], "unknown method 'npoo' (did you mean 'npo'?)"),
        (["unlearn.params.npo.bta=0.2"], "npo has no parameter 'bta' (did you mean 'beta'?) (it takes: beta)"),
        (["unlearn.params.ga.beta=0.2"], "ga has no parameter 'beta' (it takes: none)"),
        (["unlearn.params.npo.beta=high"], "unlearn.params.npo.beta: expected float, got 'high'"),
        (["unlearn.reference=disk"], "unlearn.reference must be logprobs or model"),
        (["unlearn.stop_check_every=-1"], "unlearn.stop_check_every must be >= 0"),
        (["unlearn.methods=su,undial"], "undial distils from the frozen model's full logits on forget tokens, which "
         "ref_logprobs.parquet cannot hold exactly (V floats per token); set unlearn.reference=model"),
        (["unlearn.methods=rmu", "unlearn.params.rmu.layer=2"],
         "rmu: unlearn.params.rmu.layer=2, but the model has layers 0..1 (target.num_layers=2)"),
        (["unlearn.params.su.normalize=anwser"],
         "unlearn.params.su.normalize must be one of selected | answer, got 'anwser' (did you mean 'answer'?)"),
        (["unlearn.params.su.keep=lots"], "unlearn.params.su.keep: expected float, got 'lots'"),
        (["unlearn.params.su_npo.keep=-1"], "unlearn.params.su_npo.keep must be >= 0"),
        (["unlearn.params.su_npo.normalize=answer"], "su_npo has no parameter 'normalize' (it takes: beta, keep)"),
        (["masks.score=logratio"], "masks.score must be one of prob_diff | log_ratio, got 'logratio' (did you mean"),
        (["masks.auto_scale=log10"], "masks.auto_scale must be one of linear | log, got 'log10'"),
        (["masks.score=log_ratio", "masks.gamma=-0.1"], "masks.gamma must be >= 0 (an absolute log ratio)"),
    ],
)
def test_bad_values_give_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("micro", overrides=overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_undial_runs_with_the_reference_model_kept():
    cfg = load_config("micro", overrides=["unlearn.methods=undial,su_undial,rmu", "unlearn.reference=model"])
    assert cfg.unlearn.methods == ["undial", "su_undial", "rmu"]


def test_method_parameters_from_flags_and_files(tmp_path):
    cfg = load_config("micro", overrides=["unlearn.params.npo.beta=0.2", "unlearn.params.simnpo.delta=1"])
    assert cfg.unlearn.params == {"npo": {"beta": 0.2}, "simnpo": {"delta": 1.0}}
    path = tmp_path / "run.yaml"
    path.write_text("unlearn:\n  params:\n    npo: {beta: 0.3}\n")
    assert load_config("micro", config_file=path).unlearn.params == {"npo": {"beta": 0.3}}
    changed = fingerprints(load_config("micro")), fingerprints(cfg)
    assert [s for s in ORDER if changed[0][s]["fingerprint"] != changed[1][s]["fingerprint"]] == ["unlearn", "evaluate"]


def test_choice_parameters_and_scores(tmp_path):
    cfg = load_config("micro", overrides=["unlearn.params.su.normalize=answer", "unlearn.params.su.keep=0.5",
                                          "masks.gamma=2.5", "masks.score=log_ratio"])
    assert cfg.unlearn.params == {"su": {"normalize": "answer", "keep": 0.5}}
    assert cfg.masks.score == "log_ratio" and cfg.masks.gamma == 2.5  # a log ratio has no upper bound
    path = tmp_path / "run.yaml"
    path.write_text("unlearn:\n  params:\n    su: {normalize: selected}\n")
    assert load_config("micro", config_file=path).unlearn.params == {"su": {"normalize": "selected"}}
    cfg.unlearn.params = {"su": {"normalize": "all"}}  # set in code: validate() checks it too
    with pytest.raises(ConfigError, match="must be one of selected | answer"):
        validate(cfg)


def test_unknown_preset_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'micro'"):
        load_config("mikro")


def test_gamma_changes_only_masks_and_downstream_fingerprints():
    a = fingerprints(load_config("micro"))
    b = fingerprints(load_config("micro", overrides=["masks.gamma=0.3"]))
    changed = [s for s in ORDER if a[s]["fingerprint"] != b[s]["fingerprint"]]
    assert changed == ["masks", "unlearn", "evaluate"]
    assert downstream("masks") == ["masks", "unlearn", "evaluate"]
