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

rmu, undial, ce_u and pdu (docs/metrics.md has their formulas and sources) read more than log-probs, and declare it
in their spec: `inputs` (the model's forget logits, or the output of one decoder layer) and `reference` kinds that are
not log-probs (the frozen model's layer output on retain tokens, cached exactly; its full logits on forget tokens,
which only `unlearn.reference=model` gives). rmu also declares the only parameters it updates (`updates`). Like every
loss here they average over the masked positions (answer tokens, or the selected ones), where open-unlearning's
UNDIAL and PDU average over every position of the batch, question and padding included.

Selective methods (su, su_npo) take `keep = λ`: λ · NLL on the forget answer tokens left unselected, so the template
around the facts is trained to stay. `su` also takes `normalize`: `selected` averages the ascent over the selected
tokens, `answer` sums it over them and divides by every forget answer token of the batch, so each selected token gets
the push GradDiff gives it. su_npo has no `normalize`: NPO's logπ(y|x) is a sum over tokens, with no mean to rescale.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

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
    forget_logits: Tensor | None = None  # (B, T, V); row t predicts x_{t+1}
    forget_ids: Tensor | None = None  # (B, T) input ids of the forget batch
    forget_hidden: Tensor | None = None  # (B, T, d) output of decoder layer spec.layer() (inputs "hidden")
    retain_hidden: Tensor | None = None
    ref_retain_hidden: Tensor | None = None  # the frozen model's, at retain answer positions (0 elsewhere)
    ref_forget_logits: Tensor | None = None  # the frozen model's (B, T, V) logits on the forget batch
    epoch: int = 0  # of this step, counted from 0
    state: dict[str, Any] = field(default_factory=dict)  # values a loss carries from step to step; checkpointed


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


def masked_logits(logits: Tensor, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(N, V) float logits that predict the N masked tokens, and (N,) those tokens (row t-1 predicts x_t).

    Position 0 has no prediction; masks never include it (a question precedes every answer).
    """
    keep = mask[:, 1:]
    return logits[:, :-1][keep].float(), ids[:, 1:][keep]


def soft_cross_entropy(target: Tensor, logits: Tensor) -> Tensor:
    """Mean over rows of −Σ_v target_v · log softmax(logits)_v; (N, V) each, 0 when N = 0."""
    return -(target * torch.log_softmax(logits, dim=-1)).sum() / max(1, len(logits))


def undial_loss(logits: Tensor, ref_logits: Tensor, ids: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Mean over masked tokens of CE(softmax(z_ref − β·onehot(y)), softmax(z_θ)): distil the frozen model's
    distribution with the true token's logit lowered by β. `logits`, `ref_logits`: (B, T, V); `ids`, `mask`: (B, T)."""
    z, y = masked_logits(logits, ids, mask)
    z_ref, _ = masked_logits(ref_logits, ids, mask)
    adjusted = z_ref.scatter_add(-1, y[:, None], torch.full_like(z_ref[:, :1], -beta))
    return soft_cross_entropy(torch.softmax(adjusted, dim=-1), z)


def ce_u_loss(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked tokens of CE(softmax(sg(z_θ) with z_y = −∞), softmax(z_θ)): the target is the model's own
    distribution with the true token removed, held constant."""
    z, y = masked_logits(logits, ids, mask)
    target = torch.softmax(z.detach().scatter(-1, y[:, None], float("-inf")), dim=-1)
    return soft_cross_entropy(target, z)


def logit_margin(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """Mean over masked tokens of (max_v z_v − mean_v z_v)²: 0 exactly when the prediction is uniform."""
    z, _ = masked_logits(logits, ids, mask)
    return ((z.max(-1).values - z.mean(-1)) ** 2).sum() / max(1, len(z))


def activation_mse(hidden: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over sequences of the mean over their masked positions of mean_d (h − target)², open-unlearning's RMU
    reduction; sequences with no masked position are left out. `hidden` (B, T, d); `target` (B, T, d) or (d,)."""
    per_token = (hidden.float() - target.float()).pow(2).mean(-1)
    count = mask.sum(-1)
    per_sequence = (per_token * mask).sum(-1) / count.clamp(min=1)
    return per_sequence.sum() / (count > 0).sum().clamp(min=1)


def rank_mean(value: Tensor) -> float:
    """The mean of a scalar over the processes of a distributed run, so every rank takes the same dual step."""
    value = value.detach().float().clone()
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return value.item()


def rmu(o: Outputs, alpha: float, steering_coeff: float, retain_scale: float, layer: float) -> Tensor:
    if "direction" not in o.state:  # u ~ U[0, 1)^d once per run, drawn after seed_everything; checkpointed
        u = torch.rand(o.forget_hidden.shape[-1])
        o.state["direction"] = u / u.norm()
    control = steering_coeff * o.state["direction"].to(o.forget_hidden.device)
    forget = activation_mse(o.forget_hidden, control, o.forget_mask)
    return forget + retain_scale * alpha * activation_mse(o.retain_hidden, o.ref_retain_hidden, o.retain_mask)


def undial(o: Outputs, alpha: float, beta: float) -> Tensor:
    forget = undial_loss(o.forget_logits, o.ref_forget_logits, o.forget_ids, o.forget_mask, beta)
    return forget + alpha * nll(o.retain_logp, o.retain_mask)


def ce_u(o: Outputs, alpha: float, ignore_first_n_answer_tokens: float) -> Tensor:
    after_first = o.forget_answer_mask.cumsum(-1) > ignore_first_n_answer_tokens
    return ce_u_loss(o.forget_logits, o.forget_ids, o.forget_mask & after_first)


def pdu(o: Outputs, alpha: float, retain_loss_eps: float, dual_step_size: float, dual_warmup_epochs: float) -> Tensor:
    retain = nll(o.retain_logp, o.retain_mask)
    weight = o.state.setdefault("retain_weight", alpha)  # the dual variable, starting at unlearn.alpha
    loss = logit_margin(o.forget_logits, o.forget_ids, o.forget_mask) + weight * (retain - retain_loss_eps)
    if o.epoch >= dual_warmup_epochs:  # dual ascent: the weight grows while the retain loss is above its bound
        o.state["retain_weight"] = max(0.0, weight + dual_step_size * (rank_mean(retain) - retain_loss_eps))
    return loss


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
    # reference values it reads: forget | idk | retain (top-k on retain tokens) | retain_hidden (the output of layer
    # spec.layer() on retain tokens) | forget_logits (full logits on the forget batch)
    reference: tuple[str, ...] = ()
    choices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the values a str-valued parameter may take
    selective: bool = False  # forget_mask keeps only the tokens selected in masks.parquet
    description: str = ""  # what it does, in one line (`sunlearn methods`)
    inputs: tuple[str, ...] = ()  # what else it reads of the model: logits (forget) | hidden (decoder layer outputs)
    # regex of the only parameter names the optimizer updates, {layers} standing for spec.layer() and the two below;
    # None: all
    updates: str | None = None

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

    @property
    def needs_reference_model(self) -> bool:  # reads values ref_logprobs.parquet cannot hold exactly
        return any(kind in MODEL_ONLY_REFERENCE for kind in self.reference)

    def layer(self, num_layers: int) -> int:
        """The decoder layer whose output `hidden` means: params' `layer`, or n/2 − 1 when it is negative."""
        chosen = int(self.params["layer"])
        if chosen < 0:
            return max(0, num_layers // 2 - 1)
        if chosen >= num_layers:
            raise ValueError(
                f"{self.name}: unlearn.params.{self.name}.layer={chosen}, but the model has layers 0..{num_layers - 1}"
            )
        return chosen

    def trainable(self, names: Iterable[str], num_layers: int) -> list[str] | None:
        """The parameter names the optimizer updates, of `names`; None when it updates all of them."""
        if self.updates is None:
            return None
        layer = self.layer(num_layers)
        pattern = self.updates.format(layers="|".join(str(i) for i in range(max(0, layer - 2), layer + 1)))
        chosen = [name for name in names if re.fullmatch(pattern, name)]
        if not chosen:
            raise ValueError(f"{self.name}: no parameter of the model matches {pattern} (a Llama-style layout)")
        return chosen


# what each kind of MethodSpec.reference and MethodSpec.inputs is, for `sunlearn methods`
REFERENCE_KINDS = {
    "forget": "log-probs on forget answers",
    "idk": "log-probs on refusals",
    "retain": "top-32 on retain answers",
    "retain_hidden": "layer output on retain answers",
    "forget_logits": "logits on forget answers",
}
INPUT_KINDS = {"hidden": "layer output (layer -1: n/2 - 1)", "logits": "full logits on forget answers"}
# reference kinds only the frozen model in memory gives (unlearn.reference=model): full logits, V values per token
MODEL_ONLY_REFERENCE = ("forget_logits",)
# rmu: open-unlearning's configs/trainer/RMU.yaml (steering 300, alpha 1000, down_proj of layers 5-7 around layer 7)
RMU_PARAMS = {"steering_coeff": 300.0, "retain_scale": 1000.0, "layer": -1.0}
RMU_UPDATES = r"model\.layers\.({layers})\.mlp\.down_proj\.weight"
# pdu: configs/trainer/PDU.yaml; it leaves retain_loss_eps unset (???), 0.3 is the PDU authors' TOFU value
PDU_PARAMS = {"retain_loss_eps": 0.3, "dual_step_size": 1.0, "dual_warmup_epochs": 5.0}


METHODS: dict[str, MethodSpec] = {
    m.name: m
    for m in [
        MethodSpec("ga", ga, description="GradAscent: gradient ascent on the forget answers"),
        MethodSpec("graddiff", graddiff,
                   description="GradDiff: gradient ascent on forget answers, NLL descent on retain"),
        MethodSpec("kl", kl, reference=("retain",),
                   description="GradDiff with a KL retain loss: ascent on forget, KL to the frozen model's top-32 "
                   "on retain"),
        MethodSpec("npo", npo, {"beta": 0.1}, reference=("forget",),
                   description="NPO: lowers log p(forget answer) below the frozen model's, bounded; no retain term"),
        MethodSpec("npo_gd", npo_gd, {"beta": 0.1}, reference=("forget",), description="NPO with an NLL retain loss"),
        MethodSpec("simnpo", simnpo, {"beta": 4.5, "delta": 0.0, "gamma": 0.125},
                   description="SimNPO: NPO on the length-normalised forget NLL, no reference; plus NLL on retain"),
        MethodSpec("idkdpo", idkdpo, {"beta": 0.1}, reference=("forget", "idk"),
                   description="IdkDPO (open-unlearning DPO): prefers an 'I don't know' answer to the forget "
                   "answer; plus NLL on retain"),
        # the seed paper's method: GradDiff on the selected tokens only
        MethodSpec("su", su, {"normalize": "selected", "keep": 0.0}, choices={"normalize": ("selected", "answer")},
                   selective=True,
                   description="SU (the seed paper): graddiff with the ascent on the selected forget tokens only"),
        MethodSpec("su_npo", su_npo, {"beta": 0.1, "keep": 0.0}, reference=("forget",), selective=True,
                   description="npo_gd with log p summed over the selected forget tokens only"),
        # open-unlearning's defaults (configs/trainer/WGA.yaml, SatImp.yaml); their alpha is unlearn.alpha
        MethodSpec("wga", wga, {"beta": 1.0, "gamma": 1.0},
                   description="WGA: gradient ascent with each forget token weighted by p^beta; plus NLL on retain"),
        MethodSpec("satimp", satimp, {"beta1": 5.0, "beta2": 1.0, "gamma": 0.1},
                   description="SatImp: ascent weighted by p^beta1 (1-p)^beta2, favouring tokens neither forgotten nor "
                   "certain; plus NLL on retain"),
        MethodSpec("rmu", rmu, RMU_PARAMS, reference=("retain_hidden",), inputs=("hidden",), updates=RMU_UPDATES,
                   description="RMU: steers a middle layer's output on forget tokens to a fixed random vector, "
                   "keeps it on retain"),
        MethodSpec("undial", undial, {"beta": 10.0}, reference=("forget_logits",), inputs=("logits",),
                   description="UNDIAL: distils the frozen model with the true token's logit lowered by beta; "
                   "plus NLL on retain"),
        MethodSpec("ce_u", ce_u, {"ignore_first_n_answer_tokens": 1.0}, inputs=("logits",),
                   description="CE-U (open-unlearning CEU): cross-entropy to the model's own prediction without "
                   "the true token; no retain term"),
        MethodSpec("pdu", pdu, PDU_PARAMS, inputs=("logits",),
                   description="PDU: flattens forget logits; retain NLL <= eps as a constraint, by primal-dual"),
        MethodSpec("su_rmu", rmu, RMU_PARAMS, reference=("retain_hidden",), inputs=("hidden",), updates=RMU_UPDATES,
                   selective=True, description="rmu on the selected forget tokens only"),
        MethodSpec("su_undial", undial, {"beta": 10.0}, reference=("forget_logits",), inputs=("logits",),
                   selective=True, description="undial on the selected forget tokens only"),
        MethodSpec("su_ce_u", ce_u, {"ignore_first_n_answer_tokens": 1.0}, inputs=("logits",), selective=True,
                   description="ce_u on the selected forget tokens only"),
        MethodSpec("su_pdu", pdu, PDU_PARAMS, inputs=("logits",), selective=True,
                   description="pdu with the logit flattening on the selected forget tokens only"),
    ]
}
