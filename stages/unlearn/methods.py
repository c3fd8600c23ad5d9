"""Unlearning methods: each one is only its loss, registered by name in METHODS.

Every loss works on per-token log-probs aligned with input positions: `logp[b, t] = log p(x_t | x_<t)` and a bool
`mask[b, t]` saying which positions count (answer tokens; for selective methods only the selected ones). Definitions
follow docs/metrics.md exactly:

    NLL           mean CE over the masked tokens of the whole batch (Hugging Face's `outputs.loss`)
    logπ(y|x)     sum of the masked log-probs of one sequence
    NLLavg(y)     −logπ(y|x) / (number of masked tokens of y)

`kl` needs the reference distribution on retain tokens but no second model lives in memory: the reference keeps
its top-k (k = 32) log-probs per retain answer token, and KL(p_ref ‖ p_θ) is taken over k + 1 buckets, those k
tokens plus one bucket holding the rest of the mass of each distribution. Lumping can only lose information, so this
is a lower bound of the full KL that is tight when the reference puts nearly all its mass on its top k. Like the
NLL terms, it is averaged over retain answer tokens (open-unlearning averages over every position, padding included).

Selective methods (su, su_npo) take `keep = λ`: λ · NLL on the forget answer tokens left unselected, so the template
around the facts is trained to stay. `su` also takes `normalize`: `selected` averages the ascent over the selected
tokens, `answer` sums it over them and divides by every forget answer token of the batch, so each selected token gets
the push GradDiff gives it. su_npo has no `normalize`: NPO's logπ(y|x) is a sum over tokens, with no mean to rescale.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

KL_TOP_K = 32


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """(B, T) log p(x_t | x_<t); position 0 has no prediction and holds 0."""
    logp = -F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:], reduction="none")
    return F.pad(logp, (1, 0))


def nll(logp: Tensor, mask: Tensor) -> Tensor:
    """Mean CE over the masked tokens of the batch; 0 when nothing is masked in."""
    return -(logp * mask).sum() / mask.sum().clamp(min=1)


def sequence_logprob(logp: Tensor, mask: Tensor) -> Tensor:
    """(B,) logπ(y|x): the sum of masked token log-probs of each sequence."""
    return (logp * mask).sum(-1)


def weighted_logprob(logp: Tensor, mask: Tensor, weight: Tensor) -> Tensor:
    """Mean over the masked tokens of the batch of weight · log p; `weight` (B, T) is detached, as a constant."""
    return (weight.detach() * logp * mask).sum() / mask.sum().clamp(min=1)


def npo_loss(logp: Tensor, ref_logp: Tensor, mask: Tensor, beta: float) -> Tensor:
    """−(2/β) · mean log σ(−β · (logπ_θ − logπ_ref))."""
    ratio = sequence_logprob(logp, mask) - sequence_logprob(ref_logp, mask)
    return -(2 / beta) * F.logsigmoid(-beta * ratio).mean()


def simnpo_loss(logp: Tensor, mask: Tensor, beta: float, delta: float) -> Tensor:
    """−(2/β) · mean log σ(β · (NLLavg_θ(y) − δ)); no reference model."""
    nll_avg = -sequence_logprob(logp, mask) / mask.sum(-1).clamp(min=1)
    return -(2 / beta) * F.logsigmoid(beta * (nll_avg - delta)).mean()


def dpo_loss(
    logp_win: Tensor,
    ref_win: Tensor,
    mask_win: Tensor,
    logp_lose: Tensor,
    ref_lose: Tensor,
    mask_lose: Tensor,
    beta: float,
) -> Tensor:
    """−(2/β) · mean log σ(β · [(logπ_θ − logπ_ref)(y_win) − (logπ_θ − logπ_ref)(y_lose)])."""
    win = sequence_logprob(logp_win, mask_win) - sequence_logprob(ref_win, mask_win)
    lose = sequence_logprob(logp_lose, mask_lose) - sequence_logprob(ref_lose, mask_lose)
    return -(2 / beta) * F.logsigmoid(beta * (win - lose)).mean()


def topk_kl(logits: Tensor, ref_topk_logp: Tensor, ref_topk_ids: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked positions of KL(p_ref ‖ p_θ) over the reference's top k plus one bucket for the rest.

    `logits` are the model's (B, T, V) outputs (position t predicts x_{t+1}); `ref_topk_*` are (B, T, k) aligned
    with input positions (position t describes the prediction of x_t), like every other per-token tensor here.
    """
    logq = F.pad(torch.log_softmax(logits[:, :-1].float(), dim=-1), (0, 0, 1, 0))
    logq_k = logq.gather(-1, ref_topk_ids.long())
    logp_k = ref_topk_logp.float()
    # log of the mass left outside the top k; clamped so a model that put everything on the top k stays finite
    logp_rest = torch.log1p(-logp_k.exp().sum(-1).clamp(max=1 - 1e-6))
    logq_rest = torch.log1p(-logq_k.exp().sum(-1).clamp(max=1 - 1e-6))
    kl = (logp_k.exp() * (logp_k - logq_k)).sum(-1) + logp_rest.exp() * (logp_rest - logq_rest)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class Outputs:
    """What a method's loss may read: per-token log-probs and masks of one step's batches, and reference values."""

    forget_logp: Tensor
    forget_mask: Tensor  # answer tokens; only the selected ones for selective methods
    retain_logp: Tensor
    retain_mask: Tensor
    forget_answer_mask: Tensor | None = None  # every forget answer token, selected or not
    ref_forget_logp: Tensor | None = None  # reference token log-probs at the same positions
    idk_logp: Tensor | None = None  # the forget prompts answered with a refusal
    idk_mask: Tensor | None = None
    ref_idk_logp: Tensor | None = None
    retain_logits: Tensor | None = None  # full logits, for kl only
    ref_retain_topk_logp: Tensor | None = None
    ref_retain_topk_ids: Tensor | None = None


def ga(o: Outputs, alpha: float) -> Tensor:
    return -nll(o.forget_logp, o.forget_mask)


def graddiff(o: Outputs, alpha: float) -> Tensor:
    return -nll(o.forget_logp, o.forget_mask) + alpha * nll(o.retain_logp, o.retain_mask)


def kl(o: Outputs, alpha: float) -> Tensor:
    retain = topk_kl(o.retain_logits, o.ref_retain_topk_logp, o.ref_retain_topk_ids, o.retain_mask)
    return -nll(o.forget_logp, o.forget_mask) + alpha * retain


def npo(o: Outputs, alpha: float, beta: float) -> Tensor:
    return npo_loss(o.forget_logp, o.ref_forget_logp, o.forget_mask, beta)


def npo_gd(o: Outputs, alpha: float, beta: float) -> Tensor:
    return npo(o, alpha, beta) + alpha * nll(o.retain_logp, o.retain_mask)


def simnpo(o: Outputs, alpha: float, beta: float, delta: float, gamma: float) -> Tensor:
    forget = simnpo_loss(o.forget_logp, o.forget_mask, beta, delta)
    return gamma * forget + alpha * nll(o.retain_logp, o.retain_mask)


def idkdpo(o: Outputs, alpha: float, beta: float) -> Tensor:
    forget = dpo_loss(o.idk_logp, o.ref_idk_logp, o.idk_mask, o.forget_logp, o.ref_forget_logp, o.forget_mask, beta)
    return forget + alpha * nll(o.retain_logp, o.retain_mask)


def ascent_nll(o: Outputs, normalize: str) -> Tensor:
    """NLL of the selected forget tokens, averaged over them (`selected`) or over every answer token (`answer`)."""
    if normalize == "answer":
        return -(o.forget_logp * o.forget_mask).sum() / o.forget_answer_mask.sum().clamp(min=1)
    return nll(o.forget_logp, o.forget_mask)


def kept_nll(o: Outputs) -> Tensor:
    """NLL of the forget answer tokens the selection left out (what `keep` trains to stay)."""
    return nll(o.forget_logp, o.forget_answer_mask & ~o.forget_mask)


def su(o: Outputs, alpha: float, normalize: str, keep: float) -> Tensor:
    loss = -ascent_nll(o, normalize) + alpha * nll(o.retain_logp, o.retain_mask)
    return loss + keep * kept_nll(o) if keep else loss


def su_npo(o: Outputs, alpha: float, beta: float, keep: float) -> Tensor:
    loss = npo_gd(o, alpha, beta)
    return loss + keep * kept_nll(o) if keep else loss


def wga(o: Outputs, alpha: float, beta: float, gamma: float) -> Tensor:
    """Weighted gradient ascent (arXiv 2502.19301): each forget token's ascent weighted by p^β, p its probability."""
    weight = o.forget_logp.exp() ** beta
    return gamma * weighted_logprob(o.forget_logp, o.forget_mask, weight) + alpha * nll(o.retain_logp, o.retain_mask)


def satimp(o: Outputs, alpha: float, beta1: float, beta2: float, gamma: float) -> Tensor:
    """SatImp (arXiv 2505.11953): weight p^β1 · (1 − p)^β2, which favours tokens neither forgotten nor near-certain."""
    p = o.forget_logp.exp()
    weight = p**beta1 * (1 - p) ** beta2
    return gamma * weighted_logprob(o.forget_logp, o.forget_mask, weight) + alpha * nll(o.retain_logp, o.retain_mask)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    loss: Callable[..., Tensor]  # loss(outputs, alpha, **params) -> scalar
    params: dict[str, float | str] = field(default_factory=dict)
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the values a str-valued parameter may take
    reference: tuple[str, ...] = ()  # reference values it reads: forget | idk | retain (top-k on retain tokens)
    selective: bool = False  # forget_mask keeps only the tokens selected in masks.parquet

    @property
    def needs_reference(self) -> bool:
        return bool(self.reference)

    @property
    def needs_idk(self) -> bool:  # reads idk_logp / idk_mask: the forget prompts answered with a refusal
        return "idk" in self.reference

    def with_params(self, overrides: dict[str, float | str]) -> MethodSpec:
        """The same method with some of its parameters replaced (unlearn.params.<name>)."""
        return replace(self, params={**self.params, **overrides})

    def __call__(self, outputs: Outputs, alpha: float) -> Tensor:
        return self.loss(outputs, alpha, **self.params)


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec("ga", ga),
        MethodSpec("graddiff", graddiff),
        MethodSpec("kl", kl, reference=("retain",)),
        MethodSpec("npo", npo, {"beta": 0.1}, reference=("forget",)),
        MethodSpec("npo_gd", npo_gd, {"beta": 0.1}, reference=("forget",)),
        MethodSpec("simnpo", simnpo, {"beta": 4.5, "delta": 0.0, "gamma": 0.125}),
        MethodSpec("idkdpo", idkdpo, {"beta": 0.1}, reference=("forget", "idk")),
        # the seed paper's method: GradDiff on the selected tokens only
        MethodSpec("su", su, {"normalize": "selected", "keep": 0.0}, {"normalize": ("selected", "answer")},
                   selective=True),
        MethodSpec("su_npo", su_npo, {"beta": 0.1, "keep": 0.0}, reference=("forget",), selective=True),
        # open-unlearning's defaults (configs/trainer/WGA.yaml, SatImp.yaml); their alpha is unlearn.alpha
        MethodSpec("wga", wga, {"beta": 1.0, "gamma": 1.0}),
        MethodSpec("satimp", satimp, {"beta1": 5.0, "beta2": 1.0, "gamma": 0.1}),
    ]
}
