"""PRM losses (TRL PRM-trainer semantics), the reward head over gathered step positions,
multi-head Bradley-Terry and step-score aggregation.

The end-to-end reference is transformers' own token-classification model (what TRL's PRM trainer
trains, ``trl/experimental/prm/prm_trainer.py``, formerly ``trl/trainer/prm_trainer.py``): a tiny
``LlamaForTokenClassification`` / ``Qwen2ForTokenClassification`` built from a config. Our loss from
its last hidden states + its ``score`` head must equal ``model(..., labels=labels).loss`` -- values
and the gradients of every parameter.
"""
import pytest
import torch
import torch.nn.functional as F

from alignkernels.losses.prm import (
    aggregate_step_scores,
    fused_linear_bradley_terry_loss,
    fused_linear_prm_loss,
    prm_loss,
    prm_step_scores,
)
from alignkernels.ops.steps import step_positions
from alignkernels.reference import aggregate_step_scores_reference, token_classification_loss_reference

VOCAB, SEP, PAD, BOS = 50, 3, 0, 1


def _tiny_token_classifier(family="llama", num_labels=2, seed=0):
    from transformers import LlamaConfig, LlamaForTokenClassification, Qwen2Config, Qwen2ForTokenClassification

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=num_labels, pad_token_id=PAD, max_position_embeddings=128,
    )  # fmt: skip
    if family == "llama":
        model = LlamaForTokenClassification(LlamaConfig(**common))
    else:
        model = Qwen2ForTokenClassification(Qwen2Config(**common))
    return model.float().eval()  # eval: classifier dropout off, as in the comparison below


def _trl_prm_row(prompt_len, step_lens, step_labels, sep_ids, train_on_last_step_only=False):
    """A row tokenized the way ``PRMTrainer.tokenize_row`` does it: bos + prompt, then each step's
    tokens followed by the separator tokens, the step label on the last of those tokens, -100
    everywhere else (and only the last step's label with ``train_on_last_step_only``)."""
    ids = [BOS] + torch.randint(4, VOCAB, (prompt_len,)).tolist()
    labels = [-100] * len(ids)
    if train_on_last_step_only:
        step_labels = [-100] * (len(step_labels) - 1) + [int(step_labels[-1])]
    for n, lab in zip(step_lens, step_labels):
        step = torch.randint(4, VOCAB, (n,)).tolist() + list(sep_ids)
        ids += step
        labels += [-100] * (len(step) - 1) + [int(lab)]
    return ids, labels


def _trl_batch(seed=0, sep_ids=(SEP,), padding_side="right", train_on_last_step_only=False, n_rows=3):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    rows = []
    for r in range(n_rows):
        n_steps = 1 + r % 3 + int(torch.randint(0, 2, (1,), generator=g))
        step_lens = torch.randint(1, 6, (n_steps,), generator=g).tolist()
        step_labels = torch.randint(0, 2, (n_steps,), generator=g).tolist()
        rows.append(_trl_prm_row(2 + r, step_lens, step_labels, sep_ids, train_on_last_step_only))
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((n_rows, T), PAD)
    labels = torch.full((n_rows, T), -100)  # DataCollatorForTokenClassification pads labels with -100
    attention_mask = torch.zeros(n_rows, T, dtype=torch.long)
    for b, (ids, lab) in enumerate(rows):
        n = len(ids)
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[b, sl], labels[b, sl], attention_mask[b, sl] = torch.tensor(ids), torch.tensor(lab), 1
    return input_ids, attention_mask, labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,padding_side", [("llama", "right"), ("llama", "left"), ("qwen2", "right")])
def test_matches_token_classification_model_loss_and_grads(family, padding_side):
    model = _tiny_token_classifier(family)
    input_ids, attention_mask, labels = _trl_batch(seed=1, padding_side=padding_side)
    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    loss, metrics = fused_linear_prm_loss(hidden, model.score.weight, labels, bias=model.score.bias)
    loss.backward()
    torch.testing.assert_close(loss, out.loss, rtol=1e-5, atol=1e-6)
    ours = _grads(model)
    assert ours.keys() == expected_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(ours[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    # TRL compute_accuracy: argmax over the classes at labelled tokens
    valid = labels != -100
    acc = (out.logits.argmax(-1)[valid] == labels[valid]).float().mean()
    torch.testing.assert_close(metrics["accuracy"], acc)
    assert metrics["num_steps"] == valid.sum()


def test_separator_mask_and_step_labels_and_packed_agree_with_labels():
    model = _tiny_token_classifier("llama", num_labels=3, seed=2)
    sep = (SEP, 2)  # a two-token separator: TRL labels its last token
    input_ids, attention_mask, labels = _trl_batch(seed=3, sep_ids=sep)
    labels = torch.where(labels != -100, torch.randint(0, 3, labels.shape), labels)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    W, b = model.score.weight, model.score.bias
    from_labels, _ = fused_linear_prm_loss(hidden, W, labels, bias=b)
    # separator ids + attention mask locate the same tokens; labels read there
    from_sep, _ = fused_linear_prm_loss(hidden, W, labels, bias=b, input_ids=input_ids, separator_id=sep[-1],
                                        attention_mask=attention_mask)  # fmt: skip
    # [P] step labels with an explicit step mask
    step_mask = labels != -100
    from_steps, _ = fused_linear_prm_loss(hidden, W, bias=b, step_labels=labels[step_mask], step_mask=step_mask)
    # packed: the real tokens of every row back to back
    lengths = attention_mask.sum(1)
    keep = attention_mask.bool()
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    from_packed, _ = fused_linear_prm_loss(hidden[keep], W, labels[keep], bias=b, cu_seqlens=cu)
    for value in (from_labels, from_sep, from_steps, from_packed):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_train_on_last_step_only_ignores_earlier_separators():
    model = _tiny_token_classifier("llama", seed=4)
    input_ids, attention_mask, labels = _trl_batch(seed=5, train_on_last_step_only=True)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        expected = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
    sep_mask = (input_ids == SEP) & (attention_mask != 0)
    step_labels = labels[sep_mask]  # -100 at every step but the last of each row
    assert (step_labels == -100).any()
    loss, metrics = fused_linear_prm_loss(hidden, model.score.weight, bias=model.score.bias,
                                          step_labels=step_labels, step_mask=sep_mask)  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert metrics["num_steps"] == input_ids.shape[0]


def test_a_few_training_steps_follow_the_token_classification_model():
    """Three SGD steps on the stock model loss and on ours from the same init: same parameters."""
    input_ids, attention_mask, labels = _trl_batch(seed=6, n_rows=4)
    trajectories = []
    for ours in (False, True):
        model = _tiny_token_classifier("qwen2", seed=7)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            opt.zero_grad()
            if ours:
                h = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
                loss, _ = fused_linear_prm_loss(h, model.score.weight, labels, bias=model.score.bias)
            else:
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            loss.backward()
            opt.step()
        trajectories.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(trajectories[1], trajectories[0], rtol=1e-4, atol=1e-5)


def test_triton_gather_backend_matches_torch(triton_device):
    g = torch.Generator().manual_seed(8)
    B, T, H, K = 3, 40, 24, 3
    hidden = torch.randn(B, T, H, generator=g)
    W = torch.randn(K, H, generator=g)
    bias = torch.randn(K, generator=g)
    flags = torch.rand(B, T, generator=g) < 0.2
    labels = torch.where(flags, torch.randint(0, K, (B, T), generator=g), torch.full((B, T), -100))
    results = []
    for backend, device in (("torch", "cpu"), ("triton", triton_device)):
        h = hidden.to(device).requires_grad_()
        w = W.to(device).requires_grad_()
        loss, _ = fused_linear_prm_loss(h, w, labels.to(device), bias=bias.to(device), backend=backend)
        loss.backward()
        results.append((loss.detach().cpu(), h.grad.cpu(), w.grad.cpu()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # and against the eager per-token head of reference.py
    torch.testing.assert_close(results[0][0], token_classification_loss_reference(hidden, W, bias, labels))


def test_bf16_hidden_within_tolerance():
    g = torch.Generator().manual_seed(9)
    B, T, H = 2, 30, 64
    hidden = torch.randn(B, T, H, generator=g)
    W = torch.randn(2, H, generator=g) * 0.1
    labels = torch.where(torch.rand(B, T, generator=g) < 0.3, torch.randint(0, 2, (B, T), generator=g), -100)
    loss32, _ = fused_linear_prm_loss(hidden, W, labels)
    loss16, _ = fused_linear_prm_loss(hidden.bfloat16(), W.bfloat16(), labels)
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=2e-2)


def test_no_steps_gives_zero_loss_and_zero_grads():
    hidden = torch.randn(2, 7, 8, requires_grad=True)
    W = torch.randn(2, 8, requires_grad=True)
    bias = torch.randn(2, requires_grad=True)
    labels = torch.full((2, 7), -100)
    loss, metrics = fused_linear_prm_loss(hidden, W, labels, bias=bias)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    for t in (hidden, W, bias):
        assert torch.count_nonzero(t.grad) == 0
    assert metrics["num_steps"] == 0 and metrics["accuracy"] == 0
    # steps present but every label ignored (train_on_last_step_only with no last label)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, 3] = True
    hidden.grad = None
    loss, _ = fused_linear_prm_loss(hidden, W, step_labels=torch.tensor([-100]), step_mask=mask)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0


# --------------------------------------------------------------------------------------------
# prm_loss on its own
# --------------------------------------------------------------------------------------------
def test_prm_loss_against_cross_entropy_reductions_and_gradcheck():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(13, 3, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (13,), generator=g)
    labels[[2, 5]] = -100
    loss, _ = prm_loss(logits, labels)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, ignore_index=-100))
    total, _ = prm_loss(logits, labels, reduction="sum")
    torch.testing.assert_close(total, F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"))
    per_step, _ = prm_loss(logits, labels, reduction="none")
    torch.testing.assert_close(per_step, F.cross_entropy(logits, labels, ignore_index=-100, reduction="none"))
    # transformers' fixed_cross_entropy with num_items_in_batch: sum / count
    scaled, _ = prm_loss(logits, labels, num_items_in_batch=torch.tensor(40))
    torch.testing.assert_close(scaled, total / 40)
    assert torch.autograd.gradcheck(lambda z: prm_loss(z, labels)[0], (logits,))
    # token-aligned [B, T, C] works too (= transformers' loss on its logits)
    tok = torch.randn(2, 5, 2, generator=g)
    tok_labels = torch.where(torch.rand(2, 5, generator=g) < 0.5, torch.randint(0, 2, (2, 5), generator=g), -100)
    tok_labels[0, 0] = 1
    torch.testing.assert_close(prm_loss(tok, tok_labels)[0], F.cross_entropy(tok.view(-1, 2), tok_labels.view(-1)))


def test_errors():
    hidden = torch.randn(2, 6, 8)
    W = torch.randn(2, 8)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2] = mask[1, 4] = True
    with pytest.raises(ValueError, match=r"found P = 2 steps"):
        fused_linear_prm_loss(hidden, W, step_labels=torch.tensor([0, 1, 1]), step_mask=mask)
    with pytest.raises(ValueError, match=r"weight must be \[num_labels, H\]"):
        fused_linear_prm_loss(hidden, torch.randn(2, 7), step_labels=torch.tensor([0, 1]), step_mask=mask)
    with pytest.raises(ValueError, match=r"step_labels must be in \[0, 2\)"):
        fused_linear_prm_loss(hidden, W, step_labels=torch.tensor([0, 2]), step_mask=mask)
    with pytest.raises(ValueError, match=r"bias must be \[K\]"):
        fused_linear_prm_loss(hidden, W, step_labels=torch.tensor([0, 1]), step_mask=mask, bias=torch.zeros(3))
    with pytest.raises(TypeError, match="same dtype"):
        fused_linear_prm_loss(hidden, W.double(), step_labels=torch.tensor([0, 1]), step_mask=mask)
    with pytest.raises(ValueError, match="exactly one of labels"):
        fused_linear_prm_loss(hidden, W)
    with pytest.raises(ValueError, match="step_labels needs step_mask"):
        fused_linear_prm_loss(hidden, W, step_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="token-aligned"):
        fused_linear_prm_loss(hidden, W, torch.zeros(6, 2, dtype=torch.long), step_mask=mask)
    with pytest.raises(ValueError, match="one label per step"):
        prm_loss(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be one of"):
        prm_loss(torch.randn(4, 2), torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="how must be one of"):
        aggregate_step_scores(torch.randn(3), seq_index=torch.tensor([0, 0, 1]), how="median")
    with pytest.raises(ValueError, match=r"P = 3 steps"):
        aggregate_step_scores(torch.randn(4), seq_index=torch.tensor([0, 0, 1]))


# --------------------------------------------------------------------------------------------
# Aggregation and RL scores
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["min", "mean", "last", "max", "prod", "sum"])
def test_aggregate_step_scores_forms_agree_with_loop(how):
    g = torch.Generator().manual_seed(11)
    B, T = 4, 9
    scores = torch.rand(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) < 0.4
    mask[2] = False  # no steps: empty_value
    mask[0, 1] = True
    per_seq = [[scores[b, t].item() for t in range(T) if mask[b, t]] for b in range(B)]
    expected = aggregate_step_scores_reference(per_seq, how, empty_value=-1.0)
    by_mask = aggregate_step_scores(scores, mask, how=how, empty_value=-1.0)
    pos = step_positions(mask)
    flat = scores[mask]
    by_positions = aggregate_step_scores(flat, positions=pos, how=how, empty_value=-1.0)
    by_index = aggregate_step_scores(flat, seq_index=pos.seq_index, num_sequences=B, how=how, empty_value=-1.0)
    for got in (by_mask, by_positions, by_index):
        torch.testing.assert_close(got, expected)
    # gradients: zero for non-steps and for the empty sequence, finite everywhere
    x = scores.clone().requires_grad_()
    aggregate_step_scores(x, mask, how=how).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad[~mask]) == 0
    leaf = flat.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f: aggregate_step_scores(f, positions=pos, how=how), (leaf,))


def test_aggregate_multi_head_scores():
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.2], [0.7, 0.3]])
    out = aggregate_step_scores(scores, seq_index=torch.tensor([0, 0, 2]), num_sequences=3, how="min")
    torch.testing.assert_close(out, torch.tensor([[0.1, 0.2], [0.0, 0.0], [0.7, 0.3]]))


def test_prm_step_scores_match_model_probabilities():
    model = _tiny_token_classifier("llama", seed=12)
    input_ids, attention_mask, labels = _trl_batch(seed=13)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        scores, pos = prm_step_scores(hidden, model.score.weight, bias=model.score.bias, input_ids=input_ids,
                                      separator_id=SEP, attention_mask=attention_mask)  # fmt: skip
        probs = out.logits.softmax(-1)[..., 1]
        sep = (input_ids == SEP) & (attention_mask != 0)
        torch.testing.assert_close(scores, probs[sep], rtol=1e-5, atol=1e-6)
        seq_min = prm_step_scores(hidden, model.score.weight, bias=model.score.bias, input_ids=input_ids,
                                  separator_id=SEP, attention_mask=attention_mask, how="min")  # fmt: skip
        expected = torch.stack([probs[b][sep[b]].min() for b in range(input_ids.shape[0])])
        torch.testing.assert_close(seq_min, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Multi-aspect outcome rewards
# --------------------------------------------------------------------------------------------
def test_multi_head_bradley_terry_matches_sequence_classifier():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(14)
    K = 3
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=K, pad_token_id=PAD,
    )).eval()  # fmt: skip
    B, T = 3, 11
    input_ids = torch.randint(4, VOCAB, (2 * B, T))
    lengths = torch.tensor([11, 7, 3, 9, 11, 5])
    attention_mask = (torch.arange(T)[None] < lengths[:, None]).long()
    input_ids = torch.where(attention_mask.bool(), input_ids, PAD)
    margin = torch.rand(B)
    # TRL RewardTrainer.compute_loss on the K-head logits: chunk into chosen / rejected, -logsigmoid
    rewards = model(input_ids=input_ids, attention_mask=attention_mask).logits
    c, r = torch.chunk(rewards, 2)
    expected = -F.logsigmoid(c - r - margin[:, None]).mean() + 0.01 * ((c + r) ** 2).mean()
    expected.backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    loss, metrics = fused_linear_bradley_terry_loss(
        hidden, model.score.weight, attention_mask, margin=margin, center_rewards_coefficient=0.01
    )
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    per_head, _ = fused_linear_bradley_terry_loss(hidden.detach(), model.score.weight.detach(), attention_mask,
                                                  reduction="none")  # fmt: skip
    assert per_head.shape == (K,)
    torch.testing.assert_close(per_head, -F.logsigmoid(c - r).mean(0).detach(), rtol=1e-5, atol=1e-6)
    assert {"accuracy/head_0", "accuracy/head_2"} <= metrics.keys()
    with pytest.raises(ValueError, match="2B sequences"):
        fused_linear_bradley_terry_loss(hidden[:5], model.score.weight, attention_mask[:5])
