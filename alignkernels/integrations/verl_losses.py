"""verl's losses on alignkernels: the swaps of ``alignkernels.integrations.verl.apply(losses=True)``.

The seams (verl 0.9.1, ``verl/trainer/ppo/core_algos.py``), rebound by
:mod:`alignkernels.integrations.rebind` wherever verl binds them:

- ``POLICY_LOSS_REGISTRY[name]`` for every ``name`` that is a row of
  :data:`alignkernels.losses.verl_policy.VERL_POLICY_LOSSES` → :func:`policy_loss_fn` ``(name)``, a
  function with verl's signature ``(old_log_prob, log_prob, advantages, response_mask,
  loss_agg_mode="token-mean", config=None, rollout_is_weights=None) → (pg_loss, pg_metrics)`` on
  :func:`alignkernels.losses.verl_policy.verl_policy_loss`. The registry is changed in place (the
  same dict object, so ``get_policy_loss_fn`` and every holder of the dict see it), and the
  module-level ``compute_policy_loss_<name>`` binding too (``bypass_mode`` calls
  ``compute_policy_loss_vanilla`` by name). A registered name that is not a row (a user's own
  loss) stays stock: :func:`loss_swaps` returns it for the log line.
- ``agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
  loss_scale_factor)`` → :func:`alignkernels.losses.ppo.agg_loss` with ``semantics="verl"`` (bound
  by name in ``verl/workers/utils/losses.py``, ``verl/trainer/ppo/ray_trainer.py``, ...).
- ``kl_penalty(logprob, ref_logprob, kl_penalty)`` → :func:`alignkernels.losses.kl.kl_estimate`
  with ``clamp="verl"`` (``k1``/``kl``, ``abs``, ``k2``/``mse``, ``k3``/``low_var_kl``, and the
  ``+`` straight-through forms).
- ``compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode,
  dp_size, batch_num_tokens, global_batch_size, loss_scale_factor)`` → ``(vf_loss, vf_clipfrac)``
  from :func:`alignkernels.losses.value.value_loss` with ``semantics="verl"`` (bound by name in
  ``verl/workers/utils/losses.py`` ``value_loss``); ``vf_clipfrac`` in fp32 as verl's.

Config: each policy-loss function reads verl's ``ActorConfig`` (or a DictConfig of its fields) as
verl's function for that mode does: ``clip_ratio``/``_low``/``_high``; ``clip_ratio_c`` through
``config.get`` (vanilla, dppo_*); ``tau_pos``/``tau_neg`` (sapo); ``policy_loss.clip_cov_*``,
``kl_cov_ratio``, ``ppo_kl_coef``, ``dro_beta`` with verl's fallbacks for ``None``;
``policy_loss.rollout_correction`` (``bypass_mode``: verl's ``RolloutCorrectionConfig`` read with
``.get`` and verl's defaults, as :class:`alignkernels.losses.verl_policy.RolloutCorrection`; list
values as tuples; ``rollout_is_weights`` ignored there, as verl computes its own); and
``global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
``loss_scale_factor``) as :class:`alignkernels.losses.aggregation.GlobalBatch`. Metrics come back as
Python floats under verl's keys (``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``),
as verl's ``.item()`` gives them.

Semantics: verl's values, gradients and metrics (fp64: 1e-7 relative, from verl's ``+1e-8`` in its
token-mean denominators), pinned for every swapped name in
``tests/frameworks_integration/test_verl_losses.py`` against the stock registry entry. Differences,
on purpose: a fully masked micro-batch gives 0, not NaN; bad input is a ``ValueError`` /
``TypeError`` naming the argument instead of an ``AssertionError``. ``clip_cov``'s random choice
draws from the default generator as verl's does (same seed, same tokens). ``bypass_mode`` logs the
``rollout_corr/*`` diagnostics :func:`alignkernels.losses.verl_policy.verl_rollout_correction`
computes (``kl``, ``k3_kl``, ``rollout_is_mean``, ``rollout_is_batch_norm_factor``,
``rollout_rs_masked_fraction``), not verl's other ~25 (perplexities, χ², IS spread). Memory and
numerics: those of
:mod:`alignkernels.losses.verl_policy` (eager ``[B, T]`` math; on CUDA tensors with
``backend="auto"`` the token-separable rows run the fused Triton row kernel).
"""
from __future__ import annotations

from typing import Callable

import torch

from alignkernels.integrations.rebind import Swap
from alignkernels.losses.aggregation import GlobalBatch
from alignkernels.losses.kl import kl_estimate
from alignkernels.losses.ppo import agg_loss as ppo_agg_loss
from alignkernels.losses.value import value_loss
from alignkernels.losses.verl_policy import VERL_POLICY_LOSSES, RolloutCorrection, VerlPolicyConfig, verl_policy_loss

__all__ = ["policy_loss_fn", "make_agg_loss", "make_kl_penalty", "make_value_loss", "verl_policy_config",
           "rollout_correction", "global_batch", "loss_swaps"]

# PolicyLossConfig fields a verl loss reads, with verl's value when the field is None
_POLICY_LOSS_FIELDS = {
    "clip_cov": (("clip_cov_ratio", 0.0002), ("clip_cov_lb", 1.0), ("clip_cov_ub", 5.0)),
    "kl_cov": (("kl_cov_ratio", 0.0002), ("ppo_kl_coef", 1.0)),
    "dro": (("dro_beta", None),),
}
# the modes whose verl function reads config.get("clip_ratio_c", default)
_READS_CLIP_RATIO_C = ("vanilla", "dppo_tv", "dppo_kl", "bypass_mode")
# RolloutCorrectionConfig fields bypass_mode reads, with the default of its config.get
_ROLLOUT_CORRECTION_FIELDS = (("loss_type", "ppo_clip"), ("rollout_is", None), ("rollout_is_threshold", 2.0),
                              ("rollout_is_batch_normalize", False), ("rollout_rs", None),
                              ("rollout_rs_threshold", None))  # fmt: skip


def _get(config, name: str, default=None):
    getter = getattr(config, "get", None)
    if callable(getter):  # verl's BaseConfig and omegaconf's DictConfig
        return getter(name, default)
    return getattr(config, name, default)


def verl_policy_config(loss_mode: str, config) -> VerlPolicyConfig:
    """The fields of verl's actor ``config`` that verl's ``loss_mode`` function reads, as a
    :class:`VerlPolicyConfig` (the other fields at their defaults)."""
    if config is None:
        raise ValueError(f"config: verl's policy loss {loss_mode!r} needs the actor config (ActorConfig), got None")
    clip_ratio = _get(config, "clip_ratio")
    if clip_ratio is None:
        raise TypeError(f"config must be verl's actor config with a clip_ratio (ActorConfig), "
                        f"got {type(config).__name__}")
    fields = {"clip_ratio": clip_ratio, "clip_ratio_low": _get(config, "clip_ratio_low"),
              "clip_ratio_high": _get(config, "clip_ratio_high")}  # fmt: skip
    if loss_mode in _READS_CLIP_RATIO_C:
        fields["clip_ratio_c"] = _get(config, "clip_ratio_c")
    if loss_mode == "sapo":
        fields.update(tau_pos=_get(config, "tau_pos", 1.0), tau_neg=_get(config, "tau_neg", 1.05))
    if loss_mode in _POLICY_LOSS_FIELDS:
        policy_loss = _get(config, "policy_loss")
        if policy_loss is None:
            raise ValueError(f"config.policy_loss: verl's {loss_mode!r} reads its fields, got None")
        for name, fallback in _POLICY_LOSS_FIELDS[loss_mode]:
            value = _get(policy_loss, name)
            fields[name] = fallback if value is None else value
    if loss_mode == "bypass_mode":
        fields["rollout_correction"] = rollout_correction(config)
    return VerlPolicyConfig(**fields)


def rollout_correction(config) -> RolloutCorrection:
    """verl's ``config.policy_loss.rollout_correction`` (``RolloutCorrectionConfig`` or a DictConfig of
    its fields) as :class:`RolloutCorrection`, read as verl's ``compute_policy_loss_bypass_mode`` does."""
    policy_loss = _get(config, "policy_loss")
    correction = None if policy_loss is None else _get(policy_loss, "rollout_correction")
    if correction is None:
        raise ValueError("config.policy_loss.rollout_correction: verl's 'bypass_mode' reads it, got None")
    fields = {}
    for name, default in _ROLLOUT_CORRECTION_FIELDS:
        value = _get(correction, name, default)
        if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):  # a list / ListConfig of options
            value = tuple(value)
        fields[name] = value
    return RolloutCorrection(**fields)


def global_batch(config) -> GlobalBatch:
    """verl's ``config.global_batch_info`` (the keyword arguments of its ``agg_loss``) as a
    :class:`GlobalBatch`; empty or absent: the micro-batch's own denominators."""
    info = _get(config, "global_batch_info") if config is not None else None
    if not info:
        return GlobalBatch()
    try:
        return GlobalBatch(**dict(info.items()))
    except TypeError as e:
        raise TypeError(f"config.global_batch_info: {e}; valid keys: {', '.join(GlobalBatch._fields)}") from None


def policy_loss_fn(loss_mode: str, backend: Callable[[], str], count: Callable[[], None]):
    """verl's registered policy loss ``loss_mode`` (a row of ``VERL_POLICY_LOSSES``) with verl's
    signature; ``backend()`` gives :func:`verl_policy_loss`'s backend at call time, ``count()`` is
    called once per call (the drop-in's adapter count)."""
    if loss_mode not in VERL_POLICY_LOSSES:
        raise ValueError(f"loss_mode must be one of {', '.join(VERL_POLICY_LOSSES)}; got {loss_mode!r}")

    def policy_loss(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                    rollout_is_weights=None):  # fmt: skip
        count()
        if loss_mode == "bypass_mode":  # verl: "Pre-computed IS weights (ignored, computed internally)"
            rollout_is_weights = None
        loss, metrics = verl_policy_loss(
            log_prob, old_log_prob, advantages, response_mask, loss_mode=loss_mode,
            config=verl_policy_config(loss_mode, config), loss_agg_mode=loss_agg_mode,
            rollout_is_weights=rollout_is_weights, semantics="verl", global_batch=global_batch(config),
            backend=backend(),
        )  # fmt: skip
        return loss, {name: float(value) for name, value in metrics.items()}

    policy_loss.__name__ = policy_loss.__qualname__ = f"compute_policy_loss_{loss_mode}"
    policy_loss.__doc__ = (f"verl's ``{loss_mode}`` policy loss (``POLICY_LOSS_REGISTRY[{loss_mode!r}]``) on "
                           "alignkernels.losses.verl_policy.verl_policy_loss: see "
                           "alignkernels.integrations.verl_losses.")
    return policy_loss


def make_agg_loss(count: Callable[[], None]):
    """verl's ``agg_loss`` (same signature) on :func:`alignkernels.losses.ppo.agg_loss`, ``semantics="verl"``."""

    def agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                 loss_scale_factor=None):  # fmt: skip
        count()
        return ppo_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                            global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor,
                            semantics="verl")  # fmt: skip

    agg_loss.__qualname__, agg_loss.__doc__ = "agg_loss", make_agg_loss.__doc__
    return agg_loss


def make_kl_penalty(count: Callable[[], None]):
    """verl's ``kl_penalty`` (same signature) on :func:`alignkernels.losses.kl.kl_estimate`, ``clamp="verl"``."""

    def kl_penalty(logprob: torch.Tensor, ref_logprob: torch.Tensor, kl_penalty) -> torch.Tensor:
        count()
        return kl_estimate(logprob, ref_logprob, kl_penalty, clamp="verl")

    kl_penalty.__qualname__, kl_penalty.__doc__ = "kl_penalty", make_kl_penalty.__doc__
    return kl_penalty


def make_value_loss(count: Callable[[], None]):
    """verl's ``compute_value_loss`` (same signature, ``(vf_loss, vf_clipfrac)``) on
    :func:`alignkernels.losses.value.value_loss`, ``semantics="verl"``."""

    def compute_value_loss(vpreds, returns, values, response_mask, cliprange_value, loss_agg_mode="token-mean",
                           dp_size=1, batch_num_tokens=None, global_batch_size=None,
                           loss_scale_factor=None):  # fmt: skip
        count()
        loss, metrics = value_loss(vpreds, values, returns, response_mask, cliprange_value=cliprange_value,
                                   loss_agg_mode=loss_agg_mode, semantics="verl",
                                   global_batch=GlobalBatch(dp_size, batch_num_tokens, global_batch_size,
                                                            loss_scale_factor))  # fmt: skip
        return loss, metrics["critic/vf_clipfrac"].float()  # verl: a masked mean of a float32 indicator

    compute_value_loss.__qualname__, compute_value_loss.__doc__ = "compute_value_loss", make_value_loss.__doc__
    return compute_value_loss


def loss_swaps(
    core_algos, backend: Callable[[], str], count: Callable[[], None]
) -> tuple[list[Swap], list[str], list[str]]:
    """The swaps of ``apply(losses=True)`` on the loaded ``verl.trainer.ppo.core_algos`` module:
    ``(swaps, swapped registry names, registry names left stock)``."""
    registry = vars(core_algos).get("POLICY_LOSS_REGISTRY")
    missing = [n for n in ("POLICY_LOSS_REGISTRY", "agg_loss", "kl_penalty", "compute_value_loss")
               if vars(core_algos).get(n) is None]  # fmt: skip
    if missing or not isinstance(registry, dict):
        raise ImportError(f"alignkernels.integrations.verl: {core_algos.__name__} lacks {missing or 'a dict registry'} "
                          "(verl 0.9.1 has POLICY_LOSS_REGISTRY, agg_loss, kl_penalty, "
                          "compute_value_loss)")  # fmt: skip
    swaps, swapped, stock = [], [], []
    for name, original in list(registry.items()):
        if name in VERL_POLICY_LOSSES:
            swaps.append(Swap(original, policy_loss_fn(name, backend, count), owners=(registry,)))
            swapped.append(name)
        else:
            stock.append(name)
    swaps.append(Swap(core_algos.agg_loss, make_agg_loss(count)))
    swaps.append(Swap(core_algos.kl_penalty, make_kl_penalty(count)))
    swaps.append(Swap(core_algos.compute_value_loss, make_value_loss(count)))
    return swaps, swapped, stock
