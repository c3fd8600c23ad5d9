"""Each method's loss against a value computed by hand from explicit log-softmax sums (no torch losses)."""

from __future__ import annotations

import math

import pytest
import torch

from stages.unlearn.methods import METHODS, Outputs, token_logprobs

V = 5
ALPHA = 0.7

# Two sequences of four positions; the second is padded after position 2.
FORGET_IDS = [[1, 3, 2, 4], [0, 2, 1, 0]]
FORGET_ANSWER = [[2, 3], [1, 2]]  # answer positions (label != -100)
FORGET_SELECTED = [[3], [1]]  # SU's selection: a subset of the answer positions
FORGET_UNSELECTED = [[2], [2]]  # the answer positions the selection leaves out
RETAIN_IDS = [[2, 0, 4, 1], [3, 3, 1, 2]]
RETAIN_ANSWER = [[1, 2, 3], [2, 3]]
IDK_IDS = [[1, 3, 0, 0], [0, 2, 4, 4]]
IDK_ANSWER = [[2, 3], [2, 3]]
REF_FORGET = {(0, 2): -1.1, (0, 3): -0.4, (1, 1): -2.0, (1, 2): -0.9}  # reference log-prob per answer position
REF_IDK = {(0, 2): -1.6, (0, 3): -1.3, (1, 2): -0.8, (1, 3): -1.9}
TOP_K = 2


def fixed_logits(seed: int) -> list[list[list[float]]]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, V, generator=gen, dtype=torch.float64) * 2).tolist()


FORGET_LOGITS, RETAIN_LOGITS, IDK_LOGITS, REF_RETAIN_LOGITS, REF_FORGET_LOGITS = (fixed_logits(s) for s in range(5))
D = 3  # width of the hidden states rmu reads


def fixed_hidden(seed: int) -> list[list[list[float]]]:
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randn(2, 4, D, generator=gen, dtype=torch.float64).tolist()


FORGET_HIDDEN, RETAIN_HIDDEN, REF_RETAIN_HIDDEN = (fixed_hidden(s) for s in range(3))
DIRECTION = [0.48, 0.6, 0.64]  # a unit vector: rmu's random direction, fixed here


def log_softmax(row: list[float]) -> list[float]:
    log_z = math.log(sum(math.exp(x) for x in row))
    return [x - log_z for x in row]


def logprob(logits, ids, b: int, t: int) -> float:
    """log p(x_t | x_<t): row t-1 of the logits predicts position t."""
    return log_softmax(logits[b][t - 1])[ids[b][t]]


def hand_nll(logits, ids, positions) -> float:
    terms = [-logprob(logits, ids, b, t) for b, ts in enumerate(positions) for t in ts]
    return sum(terms) / len(terms)


def hand_seq(logits, ids, positions) -> list[float]:
    return [sum(logprob(logits, ids, b, t) for t in ts) for b, ts in enumerate(positions)]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def hand_npo(positions, beta: float) -> float:
    theta = hand_seq(FORGET_LOGITS, FORGET_IDS, positions)
    ref = [sum(REF_FORGET[(b, t)] for t in ts) for b, ts in enumerate(positions)]
    return -(2 / beta) * sum(log_sigmoid(-beta * (th - r)) for th, r in zip(theta, ref, strict=True)) / 2


def hand_kl() -> float:
    terms = []
    for b, ts in enumerate(RETAIN_ANSWER):
        for t in ts:
            p = [math.exp(x) for x in log_softmax(REF_RETAIN_LOGITS[b][t - 1])]
            q = [math.exp(x) for x in log_softmax(RETAIN_LOGITS[b][t - 1])]
            top = sorted(range(V), key=lambda i: -p[i])[:TOP_K]
            p_rest, q_rest = 1 - sum(p[i] for i in top), 1 - sum(q[i] for i in top)
            terms.append(sum(p[i] * math.log(p[i] / q[i]) for i in top) + p_rest * math.log(p_rest / q_rest))
    return sum(terms) / len(terms)


def hand_undial(positions, beta: float) -> float:
    terms = []
    for b, ts in enumerate(positions):
        for t in ts:
            adjusted = list(REF_FORGET_LOGITS[b][t - 1])
            adjusted[FORGET_IDS[b][t]] -= beta
            q = [math.exp(x) for x in log_softmax(adjusted)]
            logp = log_softmax(FORGET_LOGITS[b][t - 1])
            terms.append(-sum(qv * lv for qv, lv in zip(q, logp, strict=True)))
    return sum(terms) / len(terms)


def hand_ce_u(positions) -> float:
    terms = []
    for b, ts in enumerate(positions):
        for t in ts:
            z, y = FORGET_LOGITS[b][t - 1], FORGET_IDS[b][t]
            rest = sum(math.exp(z[v]) for v in range(V) if v != y)
            logp = log_softmax(z)
            terms.append(-sum(math.exp(z[v]) / rest * logp[v] for v in range(V) if v != y))
    return sum(terms) / len(terms)


def hand_margin(positions) -> float:
    rows = [FORGET_LOGITS[b][t - 1] for b, ts in enumerate(positions) for t in ts]
    terms = [(max(z) - sum(z) / V) ** 2 for z in rows]
    return sum(terms) / len(terms)


def hand_activation_mse(hidden, target, positions) -> float:
    """Per sequence the mean over its positions of mean_d (h - target)^2, then the mean over sequences."""
    means = []
    for b, ts in enumerate(positions):
        sq = [sum((hidden[b][t][i] - target(b, t)[i]) ** 2 for i in range(D)) / D for t in ts]
        means.append(sum(sq) / len(sq))
    return sum(means) / len(means)


def hand_rmu(positions) -> float:
    c = 300.0
    forget = hand_activation_mse(FORGET_HIDDEN, lambda b, t: [c * x for x in DIRECTION], positions)
    retain = hand_activation_mse(RETAIN_HIDDEN, lambda b, t: REF_RETAIN_HIDDEN[b][t], RETAIN_ANSWER)
    return forget + 1000.0 * ALPHA * retain


def after_first_answer_token(positions):
    return [[t for t in ts if t != answer[0]] for ts, answer in zip(positions, FORGET_ANSWER, strict=True)]


def hand_weighted(weight) -> float:
    """Mean over forget answer tokens of weight(p) · log p, p = the token's probability."""
    logps = [logprob(FORGET_LOGITS, FORGET_IDS, b, t) for b, ts in enumerate(FORGET_ANSWER) for t in ts]
    return sum(weight(math.exp(lp)) * lp for lp in logps) / len(logps)


def expected(name: str) -> float:
    nll_f = hand_nll(FORGET_LOGITS, FORGET_IDS, FORGET_ANSWER)
    nll_r = hand_nll(RETAIN_LOGITS, RETAIN_IDS, RETAIN_ANSWER)
    if name == "ga":
        return -nll_f
    if name == "graddiff":
        return -nll_f + ALPHA * nll_r
    if name == "kl":
        return -nll_f + ALPHA * hand_kl()
    if name == "npo":
        return hand_npo(FORGET_ANSWER, 0.1)
    if name == "npo_gd":
        return hand_npo(FORGET_ANSWER, 0.1) + ALPHA * nll_r
    if name == "simnpo":
        beta, gamma = 4.5, 0.125
        sums = hand_seq(FORGET_LOGITS, FORGET_IDS, FORGET_ANSWER)
        nll_avg = [-s / len(ts) for s, ts in zip(sums, FORGET_ANSWER, strict=True)]
        forget = -(2 / beta) * sum(log_sigmoid(beta * x) for x in nll_avg) / 2
        return gamma * forget + ALPHA * nll_r
    if name == "idkdpo":
        beta = 0.1
        win = [
            s - sum(REF_IDK[(b, t)] for t in IDK_ANSWER[b])
            for b, s in enumerate(hand_seq(IDK_LOGITS, IDK_IDS, IDK_ANSWER))
        ]
        lose = [
            s - sum(REF_FORGET[(b, t)] for t in FORGET_ANSWER[b])
            for b, s in enumerate(hand_seq(FORGET_LOGITS, FORGET_IDS, FORGET_ANSWER))
        ]
        forget = -(2 / beta) * sum(log_sigmoid(beta * (w - lo)) for w, lo in zip(win, lose, strict=True)) / 2
        return forget + ALPHA * nll_r
    if name == "su":
        return -hand_nll(FORGET_LOGITS, FORGET_IDS, FORGET_SELECTED) + ALPHA * nll_r
    if name == "su_npo":
        return hand_npo(FORGET_SELECTED, 0.1) + ALPHA * nll_r
    if name == "wga":  # open-unlearning's defaults: beta = 1, gamma = 1
        return hand_weighted(lambda p: p) + ALPHA * nll_r
    if name == "satimp":  # beta1 = 5, beta2 = 1, gamma = 0.1
        return 0.1 * hand_weighted(lambda p: p**5 * (1 - p)) + ALPHA * nll_r
    positions = FORGET_SELECTED if name.startswith("su_") else FORGET_ANSWER
    if name in ("rmu", "su_rmu"):
        return hand_rmu(positions)
    if name in ("undial", "su_undial"):
        return hand_undial(positions, 10.0) + ALPHA * nll_r
    if name in ("ce_u", "su_ce_u"):
        return hand_ce_u(after_first_answer_token(positions))
    if name in ("pdu", "su_pdu"):  # the dual weight starts at alpha; eps = 0.3
        return hand_margin(positions) + ALPHA * (nll_r - 0.3)
    raise KeyError(name)


def mask(positions) -> torch.Tensor:
    out = torch.zeros(2, 4, dtype=torch.bool)
    for b, ts in enumerate(positions):
        out[b, ts] = True
    return out


def placed(values: dict[tuple[int, int], float]) -> torch.Tensor:
    out = torch.zeros(2, 4)
    for (b, t), v in values.items():
        out[b, t] = v
    return out


def outputs(selective: bool) -> Outputs:
    """The tensors the loop hands a method, built from the fixed batch above."""
    ids = {k: torch.tensor(v) for k, v in {"f": FORGET_IDS, "r": RETAIN_IDS, "i": IDK_IDS}.items()}
    answer = mask(RETAIN_ANSWER)
    logits = {k: torch.tensor(v, dtype=torch.float32) for k, v in {"f": FORGET_LOGITS, "r": RETAIN_LOGITS}.items()}
    ref_logp = torch.log_softmax(torch.tensor(REF_RETAIN_LOGITS, dtype=torch.float32), -1)
    top_logp, top_ids = torch.nn.functional.pad(ref_logp[:, :-1], (0, 0, 1, 0)).topk(TOP_K, dim=-1)
    return Outputs(
        forget_logp=token_logprobs(logits["f"], ids["f"]),
        forget_mask=mask(FORGET_SELECTED if selective else FORGET_ANSWER),
        forget_answer_mask=mask(FORGET_ANSWER),
        retain_logp=token_logprobs(logits["r"], ids["r"]),
        retain_mask=mask(RETAIN_ANSWER),
        ref_forget_logp=placed(REF_FORGET),
        idk_logp=token_logprobs(torch.tensor(IDK_LOGITS, dtype=torch.float32), ids["i"]),
        idk_mask=mask(IDK_ANSWER),
        ref_idk_logp=placed(REF_IDK),
        retain_logits=logits["r"],
        ref_retain_topk_logp=top_logp,
        ref_retain_topk_ids=top_ids,
        forget_logits=logits["f"],
        forget_ids=ids["f"],
        forget_hidden=torch.tensor(FORGET_HIDDEN, dtype=torch.float32),
        retain_hidden=torch.tensor(RETAIN_HIDDEN, dtype=torch.float32),
        ref_retain_hidden=torch.tensor(REF_RETAIN_HIDDEN, dtype=torch.float32) * answer.unsqueeze(-1),
        ref_forget_logits=torch.tensor(REF_FORGET_LOGITS, dtype=torch.float32),
        state={"direction": torch.tensor(DIRECTION)},
    )


ALL = ["ga", "graddiff", "kl", "npo", "npo_gd", "simnpo", "idkdpo", "su", "su_npo", "wga", "satimp",
       "rmu", "undial", "ce_u", "pdu", "su_rmu", "su_undial", "su_ce_u", "su_pdu"]  # fmt: skip


@pytest.mark.parametrize("name", ALL)
def test_loss_matches_hand_computation(name):
    spec = METHODS[name]
    got = spec(outputs(spec.selective), ALPHA)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected(name), rel=1e-5, abs=1e-5)


KEEP = 0.6


@pytest.mark.parametrize(
    ("name", "params"),
    [("su", {"normalize": "answer"}), ("su", {"keep": KEEP}), ("su", {"normalize": "answer", "keep": KEEP}),
     ("su_npo", {"keep": KEEP})],
)
def test_selective_variants_match_hand_computation(name, params):
    nll_r = hand_nll(RETAIN_LOGITS, RETAIN_IDS, RETAIN_ANSWER)
    if params.get("normalize") == "answer":  # the selected tokens' CE summed, over every answer token (4, not 2)
        selected_ce = -sum(hand_seq(FORGET_LOGITS, FORGET_IDS, FORGET_SELECTED))
        forget = -selected_ce / sum(map(len, FORGET_ANSWER)) + ALPHA * nll_r
    else:
        forget = expected(name)
    kept = hand_nll(FORGET_LOGITS, FORGET_IDS, FORGET_UNSELECTED)
    got = METHODS[name].with_params(params)(outputs(selective=True), ALPHA)
    assert got.item() == pytest.approx(forget + params.get("keep", 0.0) * kept, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(("name", "weight"), [("wga", lambda p: p), ("satimp", lambda p: 0.1 * p**5 * (1 - p))])
def test_token_weights_are_constants_of_the_gradient(name, weight):
    # open-unlearning detaches the weights: d loss / d log p_t = gamma · w(p_t) / (number of forget answer tokens)
    out = outputs(selective=False)
    logp = out.forget_logp.detach().requires_grad_(True)
    out.forget_logp = logp
    METHODS[name](out, ALPHA).backward()
    n = sum(map(len, FORGET_ANSWER))
    for b, ts in enumerate(FORGET_ANSWER):
        for t in ts:
            p = math.exp(logprob(FORGET_LOGITS, FORGET_IDS, b, t))
            assert logp.grad[b, t].item() == pytest.approx(weight(p) / n, rel=1e-4, abs=1e-7)
    assert logp.grad[0, 1].item() == 0.0  # a prompt position


def test_registry_flags_and_defaults():
    assert set(METHODS) == set(ALL)
    assert METHODS["wga"].params == {"beta": 1.0, "gamma": 1.0}
    assert METHODS["satimp"].params == {"beta1": 5.0, "beta2": 1.0, "gamma": 0.1}
    assert METHODS["su"].params == {"normalize": "selected", "keep": 0.0}
    assert METHODS["su_npo"].params == {"beta": 0.1, "keep": 0.0}
    assert METHODS["simnpo"].params == {"beta": 4.5, "delta": 0.0, "gamma": 0.125}
    assert METHODS["npo"].params == {"beta": 0.1} and METHODS["idkdpo"].params == {"beta": 0.1}
    assert METHODS["rmu"].params == {"steering_coeff": 300.0, "retain_scale": 1000.0, "layer": -1.0}
    assert METHODS["undial"].params == {"beta": 10.0}
    assert METHODS["ce_u"].params == {"ignore_first_n_answer_tokens": 1.0}
    assert METHODS["pdu"].params == {"retain_loss_eps": 0.3, "dual_step_size": 1.0, "dual_warmup_epochs": 5.0}
    assert {n for n, s in METHODS.items() if s.needs_reference} == {
        "kl", "npo", "npo_gd", "idkdpo", "su_npo", "rmu", "su_rmu", "undial", "su_undial"}  # fmt: skip
    assert {n for n, s in METHODS.items() if s.needs_reference_model} == {"undial", "su_undial"}
    assert {n for n, s in METHODS.items() if s.needs_idk} == {"idkdpo"}
    assert {n for n, s in METHODS.items() if s.selective} == {
        "su", "su_npo", "su_rmu", "su_undial", "su_ce_u", "su_pdu"}  # fmt: skip
    assert all(s.description for s in METHODS.values())
    for name in ("rmu", "undial", "ce_u", "pdu"):  # a selective variant is its method on the selected tokens only
        plain, selective = METHODS[name], METHODS[f"su_{name}"]
        assert (selective.loss, selective.params, selective.reference, selective.inputs, selective.updates) == (
            plain.loss, plain.params, plain.reference, plain.inputs, plain.updates)  # fmt: skip


def test_rmu_updates_only_down_proj_of_the_three_layers_up_to_its_own():
    names = [f"model.layers.{i}.{w}" for i in range(16) for w in ("mlp.down_proj.weight", "self_attn.q_proj.weight")]
    rmu = METHODS["rmu"]
    assert rmu.layer(16) == 7  # open-unlearning's layer 7 on its 16-layer Llama-3.2-1B
    assert rmu.trainable(names, 16) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (5, 6, 7)]
    assert rmu.with_params({"layer": 1.0}).trainable(names, 16) == [
        f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)]  # fmt: skip
    assert METHODS["graddiff"].trainable(names, 16) is None
    with pytest.raises(ValueError, match=r"rmu.layer=9, but the model has layers 0..3"):
        rmu.with_params({"layer": 9.0}).layer(4)


def test_rmu_draws_one_unit_direction_and_keeps_it():
    out = outputs(selective=False)
    out.state = {}
    first = METHODS["rmu"](out, ALPHA).item()
    direction = out.state["direction"]
    assert direction.shape == (D,) and direction.norm().item() == pytest.approx(1.0) and (direction >= 0).all()
    assert METHODS["rmu"](out, ALPHA).item() == first and out.state["direction"] is direction


def test_pdu_dual_weight_steps_by_the_retain_constraint_after_warmup():
    """λ ← max(0, λ + η·(NLL_retain − ε)) once epoch >= dual_warmup_epochs; the next loss uses the new λ."""
    nll_r = hand_nll(RETAIN_LOGITS, RETAIN_IDS, RETAIN_ANSWER)
    spec = METHODS["pdu"].with_params({"dual_step_size": 2.0})
    out = outputs(selective=False)
    out.epoch = 4  # still inside the 5 warm-up epochs
    spec(out, ALPHA)
    assert out.state["retain_weight"] == ALPHA
    out.epoch = 5
    spec(out, ALPHA)
    weight = ALPHA + 2.0 * (nll_r - 0.3)
    assert out.state["retain_weight"] == pytest.approx(weight, rel=1e-5)
    got = spec(out, ALPHA).item()
    assert got == pytest.approx(hand_margin(FORGET_ANSWER) + weight * (nll_r - 0.3), rel=1e-5)
    spec.with_params({"retain_loss_eps": 100.0})(out, ALPHA)  # far below the bound: the weight stops at 0
    assert out.state["retain_weight"] == 0.0


def test_su_with_nothing_selected_is_the_retain_loss_alone():
    out = outputs(selective=True)
    out.forget_mask = torch.zeros_like(out.forget_mask)
    nll_r = hand_nll(RETAIN_LOGITS, RETAIN_IDS, RETAIN_ANSWER)
    assert METHODS["su"](out, ALPHA).item() == pytest.approx(ALPHA * nll_r, rel=1e-5)


def test_ce_u_target_is_held_constant():
    """The target q (the model's prediction without the true token) is detached: ∂L/∂z = softmax(z) − q."""
    out = outputs(selective=False)
    out.forget_logits = out.forget_logits.clone().requires_grad_(True)
    METHODS["ce_u"](out, ALPHA).backward()
    z, y = FORGET_LOGITS[0][2], FORGET_IDS[0][3]  # (0, 3) and (1, 2) remain after the first answer token
    p = [math.exp(x) for x in log_softmax(z)]
    q = [0.0 if v == y else p[v] / (1 - p[y]) for v in range(V)]
    want = [(pv - qv) / 2 for pv, qv in zip(p, q, strict=True)]  # two positions in the mean
    assert out.forget_logits.grad[0, 2].tolist() == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_methods_command_lists_every_method_with_its_parameters(capsys):
    from pipeline.cli import main

    main(["methods"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    for name, spec in METHODS.items():
        shown = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in spec.params.items()]
        assert all(s in lines[name] for s in shown), lines[name]
    assert "beta1=5, beta2=1, gamma=0.1" in lines["satimp"] and "beta=1, gamma=1" in lines["wga"]
