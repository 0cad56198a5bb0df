"""Alignment losses end to end from hidden states, and GAE.

- ``grpo``: GRPO (TRL's ``loss_type="dapo"``, token-level importance sampling, clipping
  ε=0.2/0.2, k3 KL with β=0.04) from completion hidden states ``[B, T, H]`` and the lm_head.
  Providers: ``alignkernels:fused`` (``alignkernels.fused_linear_grpo_loss``),
  ``alignkernels:linear_logprobs+grpo_loss`` (the two public ops composed), eager (materialised
  logits → ``reference.token_logprobs_reference`` → the TRL per-token loss written out below),
  and Liger-Kernel's ``LigerFusedLinearGRPOLoss``.
- ``dpo``: DPO (sigmoid, β=0.1) over B pairs (``[2B, T, H]``: chosen rows first), the reference
  model's log-probs computed in the same step from its own hidden states without grad (as TRL
  does unless ``precompute_ref_log_probs``). Providers: ``alignkernels:fused``
  (``alignkernels.fused_linear_dpo_loss``), eager, Liger-Kernel's ``LigerFusedLinearDPOLoss``.
- ``gae``: generalised advantage estimation over ``[B, T]`` (γ=1, λ=0.95): ``alignkernels.gae``
  per backend vs the reversed Python loop over time that TRL's PPO trainer ran. Forward only.

The fused losses' keyword names are bound by name (``harness.call_mapped``), so a provider whose
op is not importable yet is skipped with a note, and one whose parameters cannot be matched is
reported as an error row, never a crash.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .cases_common import ours_check, package_check
from .cost import Cost, HeadPath, gae_cost as gae_array_cost, linear_logprobs_cost
from .harness import OpBench, Provider, call_mapped

GRPO_BETA, GRPO_EPS_LOW, GRPO_EPS_HIGH = 0.04, 0.2, 0.2
DPO_BETA = 0.1
GAE_GAMMA, GAE_LAM = 1.0, 0.95

ALIASES = {
    "hidden": ("hidden", "hidden_states", "_input", "input", "x"),
    "weight": ("weight", "lm_head_weight", "lin_weight", "lm_head"),
    "labels": ("labels", "completion_ids", "selected_token_ids", "input_ids", "targets", "target", "token_ids"),
    "old_logp": ("old_logp", "old_logps", "old_per_token_logps"),
    "ref_logp": ("ref_logp", "ref_logps", "ref_per_token_logps"),
    "advantages": ("advantages",),
    "mask": ("mask", "completion_mask", "attention_mask", "loss_mask"),
    "ref_chosen_logps": ("ref_chosen_logps", "reference_chosen_logps", "ref_chosen_logp"),
    "ref_rejected_logps": ("ref_rejected_logps", "reference_rejected_logps", "ref_rejected_logp"),
    "chosen_hidden": ("chosen_hidden", "hidden_chosen", "chosen_hidden_states"),
    "rejected_hidden": ("rejected_hidden", "hidden_rejected", "rejected_hidden_states"),
    "chosen_labels": ("chosen_labels", "labels_chosen"),
    "rejected_labels": ("rejected_labels", "labels_rejected"),
    "rewards": ("rewards", "token_rewards"),
    "values": ("values",),
}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _loss(out, inputs):
    return _first(out)


def head_loss_cost(path: HeadPath, with_reference: bool):
    """``bench.cost.linear_logprobs_cost`` over a case's tokens (``2B·T`` rows for DPO, whose
    reference pass runs the same rows through the head without grad)."""

    def cost(shape: dict, dtype: torch.dtype) -> Cost:
        rows = (2 if with_reference else 1) * shape["B"] * shape["T"]
        return linear_logprobs_cost(rows, shape["H"], shape["V"], elem_bytes=dtype.itemsize, path=path,
                                    ref_tokens=rows if with_reference else 0)  # fmt: skip

    return cost


def _eager_token_logprobs(hidden, weight, labels):
    from alignkernels.reference import token_logprobs_reference

    return token_logprobs_reference(hidden @ weight.T, labels)  # logits in the input dtype, softmax in fp32


# ------------------------------------------------------------------------------------------------
# GRPO
# ------------------------------------------------------------------------------------------------
def grpo_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    B, T, H, V = shape["B"], shape["T"], shape["H"], shape["V"]
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).long()
    near = -math.log(V)  # log-probs of a small-logit head sit near -log V
    return {
        "hidden": torch.randn(B, T, H, device=device).to(dtype).requires_grad_(True),
        "weight": (torch.randn(V, H, device=device) * (0.5 / math.sqrt(H))).to(dtype).requires_grad_(True),
        "labels": torch.randint(0, V, (B, T), device=device),
        "mask": mask,
        "old_logp": near + 0.1 * torch.randn(B, T, device=device),
        "ref_logp": near + 0.1 * torch.randn(B, T, device=device),
        "advantages": torch.randn(B, device=device),
    }


def grpo_eager(inputs):
    """TRL GRPOTrainer._compute_loss, loss_type="dapo", token-level importance sampling."""
    logp = _eager_token_logprobs(inputs["hidden"], inputs["weight"], inputs["labels"])
    ratio = torch.exp(logp - inputs["old_logp"])
    clipped = torch.clamp(ratio, 1 - GRPO_EPS_LOW, 1 + GRPO_EPS_HIGH)
    adv = inputs["advantages"][:, None]
    per_token = -torch.min(ratio * adv, clipped * adv)
    diff = inputs["ref_logp"] - logp
    per_token = per_token + GRPO_BETA * (torch.exp(diff) - diff - 1)
    mask = inputs["mask"]
    return (per_token * mask).sum() / mask.sum().clamp(min=1.0)


def grpo_fused(inputs):
    import alignkernels

    return call_mapped(
        alignkernels.fused_linear_grpo_loss, inputs, ALIASES,
        beta=GRPO_BETA, epsilon_low=GRPO_EPS_LOW, epsilon_high=GRPO_EPS_HIGH, loss_type="dapo",
        use_bias_correction_kl=False,
    )


def grpo_composed(inputs):
    import alignkernels

    logp = alignkernels.linear_logprobs(inputs["hidden"], inputs["weight"], inputs["labels"])
    values = dict(inputs, logp=logp)
    return call_mapped(
        alignkernels.grpo_loss, values, {**ALIASES, "logp": ("logp", "per_token_logps", "logps")},
        beta=GRPO_BETA, epsilon_low=GRPO_EPS_LOW, epsilon_high=GRPO_EPS_HIGH, loss_type="dapo",
        use_bias_correction_kl=False,
    )


def grpo_liger(inputs):
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss_fn = LigerFusedLinearGRPOLoss(
        beta=GRPO_BETA, epsilon_low=GRPO_EPS_LOW, epsilon_high=GRPO_EPS_HIGH, loss_type="dapo",
        use_ref_model=True, compiled=inputs["hidden"].is_cuda,
    )
    return loss_fn(
        inputs["hidden"], inputs["weight"], inputs["labels"], inputs["mask"], inputs["advantages"],
        ref_per_token_logps=inputs["ref_logp"], old_per_token_logps=inputs["old_logp"],
    )


def build_grpo() -> OpBench:
    return OpBench(
        name="grpo",
        title="GRPO (dapo, beta=0.04) end to end from hidden [B, T, H]",
        make_inputs=grpo_inputs,
        providers=[
            Provider("eager", grpo_eager, role="eager", cost=head_loss_cost(HeadPath.MATERIALISED, False)),
            Provider("alignkernels:fused", grpo_fused, role="ours", available=ours_check(("fused_linear_grpo_loss",))),
            Provider("alignkernels:linear_logprobs+grpo_loss", grpo_composed, role="ours",
                     available=ours_check(("linear_logprobs", "grpo_loss"))),
            Provider("liger", grpo_liger, available=package_check("liger_kernel.chunked_loss", "liger-kernel"),
                     note="liger: LigerFusedLinearGRPOLoss (torch.compile on GPU)",
                     cost=head_loss_cost(HeadPath.GRAD_IN_FORWARD, False)),
        ],
        shapes={
            "cuda": [{"B": 8, "T": t, "H": 3584, "V": 151936} for t in (1024, 2048, 4096)],
            "cpu": [{"B": 2, "T": t, "H": 256, "V": 32000} for t in (128, 512)],
            "quick": [{"B": 2, "T": t, "H": 32, "V": 500} for t in (8, 16)],
        },
        shape_keys=("B", "T", "H", "V"),
        x_axis="T",
        to_loss=_loss,
        cost=head_loss_cost(HeadPath.RECOMPUTE, False),
        roofline="matmul",
    )


# ------------------------------------------------------------------------------------------------
# DPO
# ------------------------------------------------------------------------------------------------
def dpo_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    B, T, H, V = shape["B"], shape["T"], shape["H"], shape["V"]
    labels = torch.randint(0, V, (2 * B, T), device=device)
    prompt = T // 4
    labels[:, :prompt] = -100  # prompt tokens carry no loss
    lengths = torch.randint(T // 2, T + 1, (2 * B,), device=device)
    labels[torch.arange(T, device=device)[None, :] >= lengths[:, None]] = -100  # right padding
    hidden = torch.randn(2 * B, T, H, device=device).to(dtype).requires_grad_(True)
    weight = (torch.randn(V, H, device=device) * (0.5 / math.sqrt(H))).to(dtype).requires_grad_(True)
    return {
        "hidden": hidden,
        "weight": weight,
        "labels": labels,
        "ref_hidden": torch.randn(2 * B, T, H, device=device).to(dtype),
        "num_pairs": B,
    }


def _dpo_sigmoid(chosen, rejected, ref_chosen, ref_rejected):
    return -F.logsigmoid(DPO_BETA * ((chosen - ref_chosen) - (rejected - ref_rejected))).mean()


def dpo_eager(inputs):
    """TRL DPOTrainer, loss_type="sigmoid": summed completion log-probs, reference in the same step."""
    B, labels = inputs["num_pairs"], inputs["labels"]
    weight = inputs["weight"]
    with torch.no_grad():
        ref = _eager_token_logprobs(inputs["ref_hidden"], weight.detach(), labels).sum(-1)
    policy = _eager_token_logprobs(inputs["hidden"], weight, labels).sum(-1)
    return _dpo_sigmoid(policy[:B], policy[B:], ref[:B], ref[B:])


def dpo_fused(inputs):
    """``fused_linear_dpo_loss`` computes the reference log-probs itself (no grad) from ``ref_hidden``
    through the same head, as Liger does; older signatures get them precomputed."""
    import inspect

    import alignkernels

    fn = alignkernels.fused_linear_dpo_loss
    B, labels, weight, hidden = inputs["num_pairs"], inputs["labels"], inputs["weight"], inputs["hidden"]
    values = dict(chosen_hidden=hidden[:B], rejected_hidden=hidden[B:], chosen_labels=labels[:B],
                  rejected_labels=labels[B:], **inputs)
    if "ref_hidden" in inspect.signature(fn).parameters:
        return call_mapped(fn, values, {**ALIASES, "ref_hidden": ("ref_hidden",)}, beta=DPO_BETA, loss_type="sigmoid")
    with torch.no_grad():
        ref = alignkernels.linear_logprobs(inputs["ref_hidden"], weight.detach(), labels).sum(-1)
    values.update(ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])
    return call_mapped(fn, values, ALIASES, beta=DPO_BETA, loss_type="sigmoid")


def dpo_liger(inputs):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    loss_fn = LigerFusedLinearDPOLoss(beta=DPO_BETA, use_ref_model=True, compiled=inputs["hidden"].is_cuda)
    weight = inputs["weight"]
    return loss_fn(weight, inputs["hidden"], inputs["labels"], ref_input=inputs["ref_hidden"], ref_weight=weight.detach())


def build_dpo() -> OpBench:
    return OpBench(
        name="dpo",
        title="DPO (sigmoid, beta=0.1) end to end from hidden [2B, T, H], reference head in the step",
        make_inputs=dpo_inputs,
        providers=[
            Provider("eager", dpo_eager, role="eager", cost=head_loss_cost(HeadPath.MATERIALISED, True)),
            Provider("alignkernels:fused", dpo_fused, role="ours",
                     available=ours_check(("fused_linear_dpo_loss", "linear_logprobs"))),
            Provider("liger", dpo_liger, available=package_check("liger_kernel.chunked_loss", "liger-kernel"),
                     note="liger: LigerFusedLinearDPOLoss (torch.compile on GPU)",
                     cost=head_loss_cost(HeadPath.GRAD_IN_FORWARD, True)),
        ],
        shapes={
            "cuda": [{"B": 4, "T": t, "H": 4096, "V": 128256} for t in (512, 1024, 2048)],
            "cpu": [{"B": 2, "T": t, "H": 256, "V": 32000} for t in (64, 256)],
            "quick": [{"B": 1, "T": t, "H": 32, "V": 500} for t in (8, 16)],
        },
        shape_keys=("B", "T", "H", "V"),
        x_axis="T",
        to_loss=_loss,
        cost=head_loss_cost(HeadPath.RECOMPUTE, True),
        roofline="matmul",
    )


# ------------------------------------------------------------------------------------------------
# GAE
# ------------------------------------------------------------------------------------------------
def gae_inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> dict:
    B, T = shape["B"], shape["T"]
    lengths = torch.randint(T // 2, T + 1, (B,), device=device)
    mask = (torch.arange(T, device=device)[None, :] < lengths[:, None]).float()
    return {
        "rewards": torch.randn(B, T, device=device) * mask,
        "values": torch.randn(B, T, device=device) * mask,
        "mask": mask,
    }


def gae_loop(inputs):
    """The reversed loop over time of TRL's PPO trainer (rewards/values already zero past the end)."""
    rewards, values = inputs["rewards"], inputs["values"]
    T = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else torch.zeros_like(last)
        delta = rewards[:, t] + GAE_GAMMA * next_values - values[:, t]
        last = delta + GAE_GAMMA * GAE_LAM * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values


def _gae_ours(backend):
    def run(inputs):
        import alignkernels

        return call_mapped(alignkernels.gae, inputs, ALIASES, gamma=GAE_GAMMA, lam=GAE_LAM, backend=backend)

    def probe(device):
        import alignkernels

        z = torch.zeros(1, 4, device=device)
        call_mapped(alignkernels.gae, {"rewards": z, "values": z, "mask": z + 1}, ALIASES, backend=backend)

    check = ours_check(("gae",), backend, probe if backend == "cuda" else None)
    if backend == "torch":
        inner = check
        check = lambda device: inner(device) or (  # noqa: E731
            "GPU runs report triton/cuda; the torch path is the CPU backend" if device.type == "cuda" else None
        )
    return Provider(f"alignkernels:{backend}", run, role="ours", available=check)


def gae_cost(shape, dtype):
    return gae_array_cost(shape["B"], shape["T"])


def build_gae() -> OpBench:
    return OpBench(
        name="gae",
        title="GAE (gamma=1, lambda=0.95) over [B, T], forward only",
        make_inputs=gae_inputs,
        providers=[
            Provider("python-loop", gae_loop, role="eager"),
            _gae_ours("triton"),
            _gae_ours("cuda"),
            _gae_ours("torch"),
        ],
        shapes={
            "cuda": [{"B": 64, "T": t} for t in (1024, 4096, 8192)],
            "cpu": [{"B": 64, "T": t} for t in (512, 2048)],
            "quick": [{"B": 4, "T": t} for t in (16, 64)],
        },
        shape_keys=("B", "T"),
        x_axis="T",
        to_loss=None,
        cost=gae_cost,
        roofline="bandwidth",
        default_dtype={"cuda": torch.float32, "cpu": torch.float32},
        fixed_dtype=torch.float32,
    )
