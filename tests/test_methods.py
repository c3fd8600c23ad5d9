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


FORGET_LOGITS, RETAIN_LOGITS, IDK_LOGITS, REF_RETAIN_LOGITS = (fixed_logits(s) for s in range(4))


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
    )


@pytest.mark.parametrize(
    "name", ["ga", "graddiff", "kl", "npo", "npo_gd", "simnpo", "idkdpo", "su", "su_npo", "wga", "satimp"]
)
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
    assert set(METHODS) == {"ga", "graddiff", "kl", "npo", "npo_gd", "simnpo", "idkdpo", "su", "su_npo", "wga",
                            "satimp"}
    assert METHODS["wga"].params == {"beta": 1.0, "gamma": 1.0}
    assert METHODS["satimp"].params == {"beta1": 5.0, "beta2": 1.0, "gamma": 0.1}
    assert METHODS["su"].params == {"normalize": "selected", "keep": 0.0}
    assert METHODS["su_npo"].params == {"beta": 0.1, "keep": 0.0}
    assert METHODS["simnpo"].params == {"beta": 4.5, "delta": 0.0, "gamma": 0.125}
    assert METHODS["npo"].params == {"beta": 0.1} and METHODS["idkdpo"].params == {"beta": 0.1}
    assert {n for n, s in METHODS.items() if s.needs_reference} == {"kl", "npo", "npo_gd", "idkdpo", "su_npo"}
    assert {n for n, s in METHODS.items() if s.needs_idk} == {"idkdpo"}
    assert {n for n, s in METHODS.items() if s.selective} == {"su", "su_npo"}


def test_su_with_nothing_selected_is_the_retain_loss_alone():
    out = outputs(selective=True)
    out.forget_mask = torch.zeros_like(out.forget_mask)
    nll_r = hand_nll(RETAIN_LOGITS, RETAIN_IDS, RETAIN_ANSWER)
    assert METHODS["su"](out, ALPHA).item() == pytest.approx(ALPHA * nll_r, rel=1e-5)


def test_methods_command_lists_every_method_with_its_parameters(capsys):
    from pipeline.cli import main

    main(["methods"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    for name, spec in METHODS.items():
        assert all(f"{k}={v}" in lines[name] for k, v in spec.params.items()), lines[name]
    assert "beta1=5.0, beta2=1.0, gamma=0.1" in lines["satimp"] and "beta=1.0, gamma=1.0" in lines["wga"]
