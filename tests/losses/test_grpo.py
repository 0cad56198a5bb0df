"""GRPO family vs TRL 1.16's own ``GRPOTrainer._compute_loss``, called unbound on plain tensors
with a minimal stand-in ``self`` (the attributes it reads) and a model stub returning given
per-token log-probs. Values, gradients w.r.t. logp (and entropy) and logged metrics, fp32."""
import types
from collections import defaultdict

import pytest
import torch

from alignkernels.losses.advantages import nanmax, nanmin, nanstd
from alignkernels.losses.grpo import (
    GRPO_LOSS_TYPES,
    GRPOLoss,
    group_advantages,
    grpo_loss,
    vllm_importance_sampling_ratio,
)
from alignkernels.reference import group_advantages_reference

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
GRPOTrainer = trl_grpo.GRPOTrainer

RTOL, ATOL = 1e-5, 1e-6


class _OneProcessAccelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def _trl_loss(logp, old_logp, ref_logp, advantages, mask, *, entropy=None, is_ratio=None, sampling_logp=None,
              num_items_in_batch=None, training=True, **cfg):
    """Run TRL's _compute_loss; returns (loss, metrics dict of floats)."""
    B, T = logp.shape
    if entropy is None:
        entropy = torch.zeros_like(logp)
    stub = types.SimpleNamespace()
    stub._get_per_token_logps_and_entropies = lambda model, *a, **k: (logp, entropy, None)
    stub.top_entropy_quantile = cfg.get("top_entropy_quantile", 1.0)
    stub.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, stub)
    stub.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    stub.get_gamma_weights = GRPOTrainer.get_gamma_weights
    stub.off_policy_mask_threshold = cfg.get("off_policy_mask_threshold")
    stub.importance_sampling_level = cfg.get("importance_sampling_level", "token")
    stub.beta = cfg.get("beta", 0.0)
    stub.loss_type = cfg.get("loss_type", "dapo")
    stub.epsilon_low = cfg.get("epsilon_low", 0.2)
    stub.epsilon_high = cfg.get("epsilon_high") if cfg.get("epsilon_high") is not None else stub.epsilon_low
    stub.args = types.SimpleNamespace(
        use_bias_correction_kl=cfg.get("use_bias_correction_kl", True),
        delta=cfg.get("delta"),
        sapo_temperature_pos=cfg.get("sapo_temperature_pos", 1.0),
        sapo_temperature_neg=cfg.get("sapo_temperature_neg", 1.05),
        vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
        steps_per_generation=cfg.get("steps_per_generation") or cfg.get("gradient_accumulation_steps", 1),
        entropy_target=0.2,
    )  # fmt: skip
    stub.use_vllm = is_ratio is not None
    stub.vllm_importance_sampling_correction = True
    stub.model = types.SimpleNamespace(training=training)
    stub.current_gradient_accumulation_steps = cfg.get("gradient_accumulation_steps", 1)
    stub.max_completion_length = cfg.get("max_completion_length")
    stub.accelerator = _OneProcessAccelerator()
    stub.accelerator.num_processes = cfg.get("num_processes", 1)
    stub.entropy_coef = cfg.get("entropy_coef", 0.0)
    stub._entropy_bonus_enabled = stub.entropy_coef != 0.0
    stub.use_adaptive_entropy = False
    stub.aux_loss_enabled = False
    stub._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": advantages,
        "num_items_in_batch": mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch),
    }
    if old_logp is not None:
        inputs["old_per_token_logps"] = old_logp
    if ref_logp is not None:
        inputs["ref_per_token_logps"] = ref_logp
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    if sampling_logp is not None:
        inputs["sampling_per_token_logps"] = sampling_logp
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    mode = "train" if training else "eval"
    return loss, {k: v[0] for k, v in stub._metrics[mode].items()}


def _data(B=6, T=9, seed=0, empty_row=True, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(B, T, generator=g)
    old = logp + 0.35 * torch.randn(B, T, generator=g)
    ref = logp + 0.3 * torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[1] = 1  # one-token completion
    if empty_row:
        lengths[-1] = 0  # fully masked completion
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    adv = torch.randn(B, T, generator=g) if token_adv else torch.randn(B, generator=g)
    entropy = 2 * torch.rand(B, T, generator=g)
    return logp, old, ref, adv, mask, entropy


def _compare(cfg, *, token_adv=False, on_policy=False, with_ref=True, with_entropy=True, is_ratio_mode=None,
             sampling=False, seed=0, empty_row=True):
    logp, old, ref, adv, mask, entropy = _data(seed=seed, token_adv=token_adv, empty_row=empty_row)
    is_ratio = None
    sampling_logp = None
    if sampling or is_ratio_mode:
        sampling_logp = old + 0.2 * torch.randn_like(old)
    if is_ratio_mode:
        is_ratio = vllm_importance_sampling_ratio(old, sampling_logp, mask, mode=is_ratio_mode, clip_min=0.5,
                                                  clip_max=1.5)  # fmt: skip
    ref_in = ref if with_ref else None
    old_in = None if on_policy else old

    trl_cfg = {k: v for k, v in cfg.items() if k not in ("num_items_in_batch", "training")}
    lp_trl = logp.clone().requires_grad_(True)
    ent_trl = entropy.clone().requires_grad_(True)
    loss_t, met_t = _trl_loss(
        lp_trl, old_in, ref_in, adv, mask, entropy=ent_trl, is_ratio=is_ratio, sampling_logp=sampling_logp,
        num_items_in_batch=cfg.get("num_items_in_batch"), training=cfg.get("training", True), **trl_cfg,
    )  # fmt: skip
    loss_t.backward()

    lp = logp.clone().requires_grad_(True)
    ent = entropy.clone().requires_grad_(True)
    loss, met = grpo_loss(
        lp, old_in, ref_in, adv, mask, entropy=ent if with_entropy else None, importance_sampling_ratio=is_ratio,
        sampling_logp=sampling_logp, **cfg,
    )  # fmt: skip
    loss.backward()

    torch.testing.assert_close(loss.detach(), loss_t.detach().to(loss.dtype), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(lp.grad, lp_trl.grad, rtol=RTOL, atol=ATOL)
    if cfg.get("entropy_coef", 0.0):
        torch.testing.assert_close(ent.grad, ent_trl.grad, rtol=RTOL, atol=ATOL)
    expected = dict(met_t)
    if not with_entropy:
        expected.pop("entropy")
    assert set(met) == set(expected), (sorted(met), sorted(expected))
    for k, v in expected.items():
        got = float(met[k])
        if v != v:  # NaN in TRL (e.g. min over no sequences)
            assert got != got, k
        else:
            assert got == pytest.approx(v, rel=RTOL, abs=ATOL), k
    return loss, met


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_loss_types_match_trl(loss_type, level):
    cfg = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04, max_completion_length=12)
    _compare(cfg)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo", "luspo"])
def test_asymmetric_clip_delta_and_token_advantages(loss_type):
    cfg = dict(loss_type=loss_type, epsilon_low=0.1, epsilon_high=0.28, delta=1.3, max_completion_length=9)
    _compare(cfg, token_adv=True, with_ref=False)


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_kl_bias_correction(bias_correction, level):
    cfg = dict(loss_type="grpo", beta=0.1, use_bias_correction_kl=bias_correction, importance_sampling_level=level)
    _compare(cfg)


def test_on_policy_old_logp_none():
    loss, met = _compare(dict(loss_type="dapo", beta=0.02), on_policy=True)
    assert float(met["clip_ratio/region_mean"]) == 0.0  # ratio is exactly 1


@pytest.mark.parametrize(
    "cfg",
    [
        dict(loss_type="dapo", gradient_accumulation_steps=4, steps_per_generation=2, num_items_in_batch=57,
             num_processes=2),
        dict(loss_type="cispo", epsilon_high=1.1, gradient_accumulation_steps=3, num_items_in_batch=40),
        dict(loss_type="vespo", gradient_accumulation_steps=2, steps_per_generation=4, num_items_in_batch=33),
        dict(loss_type="grpo", gradient_accumulation_steps=4),
        dict(loss_type="bnpo", gradient_accumulation_steps=4, training=False),
        dict(loss_type="dapo", gradient_accumulation_steps=4, num_items_in_batch=80, training=False),
        dict(loss_type="dr_grpo", gradient_accumulation_steps=2, max_completion_length=32),
        dict(loss_type="sapo", sapo_temperature_pos=0.7, sapo_temperature_neg=1.3, gradient_accumulation_steps=2),
    ],
)  # fmt: skip
def test_normalisation_matches_trl(cfg):
    _compare(cfg, with_ref=False)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "vespo"])
def test_vllm_importance_sampling_correction(mode, loss_type):
    if loss_type == "vespo" and mode.startswith("sequence"):
        pytest.skip("TRL rejects sequence-level IS modes with vespo")
    _compare(dict(loss_type=loss_type, beta=0.05), is_ratio_mode=mode)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "cispo"])
def test_off_policy_mask_and_top_entropy_and_entropy_bonus(loss_type):
    cfg = dict(loss_type=loss_type, off_policy_mask_threshold=0.01, top_entropy_quantile=0.4, entropy_coef=0.03,
               gradient_accumulation_steps=2, epsilon_high=1.2 if loss_type == "cispo" else None)  # fmt: skip
    _compare(cfg, sampling=True)


def test_metrics_without_entropy_and_names():
    _, met = _compare(dict(loss_type="dapo", beta=0.1), with_entropy=False)
    for name in ("kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert name in met
    assert "entropy" not in met


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_all_tokens_masked_is_finite_with_zero_grad(loss_type, level):
    logp, old, ref, adv, _, entropy = _data()
    mask = torch.zeros_like(logp, dtype=torch.bool)
    # garbage at masked positions must not leak into the loss or the gradient
    old = old.masked_fill(torch.ones_like(mask), float("nan"))
    ref = ref.masked_fill(torch.ones_like(mask), float("-inf"))
    lp = logp.clone().requires_grad_(True)
    ent = entropy.clone().requires_grad_(True)
    loss, met = grpo_loss(lp, old, ref, adv, mask, beta=0.1, loss_type=loss_type, importance_sampling_level=level,
                          max_completion_length=9, entropy=ent, entropy_coef=0.1)  # fmt: skip
    loss.backward()
    assert torch.isfinite(loss) and float(loss.detach()) == 0.0
    assert torch.equal(lp.grad, torch.zeros_like(lp))
    assert torch.equal(ent.grad, torch.zeros_like(ent))
    assert float(met["kl"]) == 0.0


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_zero_advantages_give_zero_policy_loss(loss_type):
    logp, old, ref, _, mask, _ = _data()
    lp = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, old, None, torch.zeros(logp.shape[0]), mask, loss_type=loss_type, max_completion_length=9)
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(lp.grad, torch.zeros_like(lp))


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo"])
def test_one_token_completions(loss_type):
    g = torch.Generator().manual_seed(3)
    logp = -torch.rand(5, 1, generator=g)
    old = logp + 0.4 * torch.randn(5, 1, generator=g)
    ref = logp + 0.1 * torch.randn(5, 1, generator=g)
    adv = torch.randn(5, generator=g)
    mask = torch.ones(5, 1, dtype=torch.long)
    lp_t = logp.clone().requires_grad_(True)
    loss_t, _ = _trl_loss(lp_t, old, ref, adv, mask, loss_type=loss_type, beta=0.05)
    loss_t.backward()
    lp = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, old, ref, adv, mask, loss_type=loss_type, beta=0.05)
    loss.backward()
    torch.testing.assert_close(loss.detach(), loss_t.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(lp.grad, lp_t.grad, rtol=RTOL, atol=ATOL)


def test_bf16_inputs_close_to_fp32():
    logp, old, ref, adv, mask, _ = _data(seed=5)
    l32, _ = grpo_loss(logp, old, ref, adv, mask, beta=0.04, loss_type="grpo")
    l16, _ = grpo_loss(logp.bfloat16(), old.bfloat16(), ref.bfloat16(), adv.bfloat16(), mask, beta=0.04,
                       loss_type="grpo")  # fmt: skip
    assert l16.dtype == torch.float32
    # bf16 rounding of the inputs only (8 bits of mantissa): stated tolerance 2e-2 relative
    torch.testing.assert_close(l16, l32, rtol=2e-2, atol=2e-3)


def test_module_matches_function():
    logp, old, ref, adv, mask, _ = _data(seed=7)
    mod = GRPOLoss(loss_type="grpo", beta=0.04, epsilon_high=0.28)
    a, _ = mod(logp, old, ref, adv, mask)
    b, _ = grpo_loss(logp, old, ref, adv, mask, loss_type="grpo", beta=0.04, epsilon_high=0.28)
    assert torch.equal(a, b)
    c, _ = mod(logp, old, ref, adv, mask, loss_type="bnpo")
    d, _ = grpo_loss(logp, old, ref, adv, mask, loss_type="bnpo", beta=0.04, epsilon_high=0.28)
    assert torch.equal(c, d)


def test_bad_inputs_raise():
    logp, old, ref, adv, mask, _ = _data()
    with pytest.raises(ValueError, match="dapo"):  # lists the valid ones
        grpo_loss(logp, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="Unknown loss_type"):
        GRPOLoss(loss_type="nope")
    with pytest.raises(ValueError, match="ref_logp"):
        grpo_loss(logp, old, None, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(logp, old, ref, adv, mask, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="old_logp"):
        grpo_loss(logp, old[:, :-1], ref, adv, mask)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, ref, adv[:-1], mask)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logp, old, ref, adv, mask[:, :-1])
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(logp, old, ref, adv, mask, importance_sampling_level="tok")
    with pytest.raises(ValueError, match="entropy"):
        grpo_loss(logp, old, ref, adv, mask, top_entropy_quantile=0.5)
    with pytest.raises(TypeError, match="logp"):
        grpo_loss(logp.long(), old, ref, adv, mask)


# ---------------------------------------------------------------------------------------------
# group_advantages
# ---------------------------------------------------------------------------------------------
def test_nan_statistics_match_trl():
    """Our host-sync-free nanstd / nanmin / nanmax against TRL's own functions."""
    from trl.trainer import utils as trl_utils

    x = torch.randn(6, 5)
    x[0, 1] = float("nan")
    x[2] = float("nan")
    x[3, 1:] = float("nan")
    torch.testing.assert_close(nanstd(x, dim=1), trl_utils.nanstd(x, dim=1), equal_nan=True)
    torch.testing.assert_close(nanstd(x, dim=0, keepdim=True), trl_utils.nanstd(x, dim=0, keepdim=True),
                               equal_nan=True)  # fmt: skip
    torch.testing.assert_close(nanstd(x), trl_utils.nanstd(x), equal_nan=True)
    for row in (x[0], x[2], x[3], torch.tensor([float("nan")])):
        torch.testing.assert_close(nanmin(row), trl_utils.nanmin(row), equal_nan=True)
        torch.testing.assert_close(nanmax(row), trl_utils.nanmax(row), equal_nan=True)


def test_group_advantages_reference_is_the_math():
    """The oracle itself, on numbers worked by hand: group [1, 2, 3] has mean 2 and sample std 1."""
    rewards = torch.tensor([[1.0], [2.0], [3.0], [5.0], [5.0], [float("nan")]])
    got = group_advantages_reference(rewards, 3, "group")
    expected = torch.tensor([-1 / (1 + 1e-4), 0.0, 1 / (1 + 1e-4), 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scale", ["group", "batch", "none", True, False])
@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
@pytest.mark.parametrize("group_size", [1, 4])
def test_group_advantages_match_trl(scale, aggregation, group_size):
    g = torch.Generator().manual_seed(11)
    rewards = torch.randn(12, 3, generator=g)
    rewards[2, 1] = float("nan")  # one reward function did not score this completion
    rewards[5] = float("nan")  # unscorable completion
    rewards[8:12, 0] = 1.0  # a group with constant reward on one function
    weights = [0.5, 1.0, 2.0]
    ref_scale = {True: "group", False: "none"}.get(scale, scale)
    expected = group_advantages_reference(rewards, group_size, ref_scale, weights, aggregation)
    got = group_advantages(rewards, group_size, scale=scale, reward_weights=weights,
                           multi_objective_aggregation=aggregation)  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert got[5] == 0.0


def test_group_advantages_single_reward_and_stats():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv, stats = group_advantages(rewards, 4, return_stats=True)
    expected = group_advantages_reference(rewards[:, None], 4, "group")
    torch.testing.assert_close(adv, expected)
    assert torch.equal(adv[4:], torch.zeros(4))  # constant group -> 0 advantages
    assert float(stats["frac_reward_zero_std"]) == 0.5
    assert float(stats["reward"]) == pytest.approx(0.75)
    assert float(stats["rewards/0/mean"]) == pytest.approx(0.75)
    assert float(stats["reward_std"]) == pytest.approx(float(rewards.std()), rel=1e-6)


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="divide"):
        group_advantages(torch.randn(10), 4)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.randn(8), 4, scale="global")
    with pytest.raises(ValueError, match="reward_weights"):
        group_advantages(torch.randn(8, 2), 4, reward_weights=[1.0])


# ---------------------------------------------------------------------------------------------
# Fused Triton backend (interpreter on CPU tensors, or the GPU) vs the PyTorch transcription
# ---------------------------------------------------------------------------------------------
def _backends_agree(device, B=6, T=9, seed=0, token_adv=False, empty_row=True, **kw):
    logp, old, ref, adv, mask, entropy = (t.to(device) for t in _data(B, T, seed, empty_row, token_adv))
    if kw.pop("on_policy", False):
        old = None
    extra = kw.pop("extra", None)
    if extra is not None:
        samp = (old if old is not None else logp) + 0.2 * torch.randn_like(logp)
        if extra == "opsm":
            kw.update(off_policy_mask_threshold=0.01, sampling_logp=samp, top_entropy_quantile=0.5, entropy_coef=0.02)
        else:
            kw["importance_sampling_ratio"] = vllm_importance_sampling_ratio(
                old, samp, mask, mode=extra, clip_min=0.5, clip_max=1.5
            )
    out = {}
    for backend in ("torch", "triton"):
        lp = logp.clone().requires_grad_(True)
        loss, met = grpo_loss(lp, old, ref, adv, mask, entropy=entropy, backend=backend, max_completion_length=T + 3,
                              **kw)  # fmt: skip
        loss.backward()
        out[backend] = (loss.detach(), lp.grad, met)
    (l0, g0, m0), (l1, g1, m1) = out["torch"], out["triton"]
    torch.testing.assert_close(l1, l0, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(g1, g0, rtol=RTOL, atol=ATOL)
    assert set(m0) == set(m1)
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], rtol=RTOL, atol=ATOL, equal_nan=True, msg=k)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo", "luspo", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_triton_backend_matches_torch(loss_type, level, triton_device):
    eps_high = 1.2 if loss_type == "cispo" else 0.28
    _backends_agree(triton_device, loss_type=loss_type, importance_sampling_level=level, beta=0.04,
                    epsilon_high=eps_high)  # fmt: skip


@pytest.mark.parametrize(
    "kw",
    [
        dict(loss_type="grpo", delta=1.3, token_adv=True, use_bias_correction_kl=False, beta=0.1),
        dict(loss_type="dapo", importance_sampling_level="sequence", token_adv=True, beta=0.1),
        dict(loss_type="dapo", on_policy=True, beta=0.05),
        dict(loss_type="grpo", extra="token_truncate", beta=0.05),
        dict(loss_type="luspo", importance_sampling_level="sequence", extra="sequence_mask"),
        dict(loss_type="cispo", epsilon_high=1.1, extra="opsm"),
        dict(loss_type="sapo", extra="opsm", beta=0.02),
    ],
)
def test_triton_backend_options(kw, triton_device):
    _backends_agree(triton_device, **kw)


def test_triton_backend_multi_tile_and_all_masked(triton_device):
    # T > the largest tile (4096): the row loops and the sequence-level first pass span tiles
    _backends_agree(triton_device, B=2, T=4100, seed=3, loss_type="grpo", importance_sampling_level="sequence",
                    beta=0.04, empty_row=False)  # fmt: skip
    logp, old, ref, adv, _, _ = (t.to(triton_device) for t in _data())
    lp = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(lp, old, ref, adv, torch.zeros_like(logp), beta=0.1, backend="triton")
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(lp.grad, torch.zeros_like(lp))


@pytest.mark.gpu
def test_gpu_triton_backend_large():
    _backends_agree("cuda", B=8, T=4096, seed=1, loss_type="dapo", beta=0.04, token_adv=True)
    _backends_agree("cuda", B=8, T=4096, seed=2, loss_type="grpo", importance_sampling_level="sequence")


def test_group_advantages_match_the_math_oracle_in_fp64():
    """Random batches (group sizes 1-4, 1-3 reward functions, 30% NaN, constant groups) in fp64:
    the library equals the loop-over-groups oracle to rounding, for every scale and aggregation."""
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        G, n, K = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (5, 4, 4))
        rewards = torch.randn(G * n, K, generator=g, dtype=torch.float64)
        rewards[torch.rand(G * n, K, generator=g) < 0.3] = float("nan")
        if trial % 5 == 0:
            rewards[:G, 0] = 1.0
        weights = (torch.rand(K, generator=g) * 2).tolist()
        for scale in ("group", "batch", "none"):
            for aggregation in ("sum_then_normalize", "normalize_then_sum"):
                got = group_advantages(rewards, G, scale=scale, reward_weights=weights,
                                       multi_objective_aggregation=aggregation)  # fmt: skip
                expected = group_advantages_reference(rewards, G, scale, weights, aggregation)
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
