"""The hand-written DPO and GRPO objectives (etbench.training.preference) on hand-computed tiny cases, and the
padded next-token read-out they share with the supervised recall rows (etbench.training.loop)."""

from __future__ import annotations

import math

import pytest
import torch

from etbench.models import toy
from etbench.training import preference
from etbench.training.loop import add_lora, next_token_logprobs, padded_answer_token_loss


def test_dpo_loss_is_log_2_when_policy_is_the_reference():
    policy = torch.tensor([-1.3, -0.2, -4.0])
    rejected = torch.tensor([-2.0, -3.1, -0.5])
    loss = preference.dpo_loss(policy, rejected, policy.clone(), rejected.clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)


def test_dpo_loss_hand_computed():
    # chosen gained 0.5 nats over the reference, rejected lost 0.5: margin 1, beta 0.5 -> -log sigmoid(0.5)
    loss = preference.dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                               torch.tensor([-1.5]), beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-6)  # 0.474077


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    chosen = torch.tensor([-1.0], requires_grad=True)
    rejected = torch.tensor([-1.0], requires_grad=True)
    preference.dpo_loss(chosen, rejected, torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.1).backward()
    # d/dmargin of -log sigmoid(beta margin) at margin 0 is -beta / 2
    assert chosen.grad.item() == pytest.approx(-0.05) and rejected.grad.item() == pytest.approx(0.05)


def test_group_advantage_is_zero_when_all_rewards_are_equal():
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert torch.equal(preference.group_advantages(rewards), torch.zeros(2, 4))


def test_group_advantage_hand_computed():
    # mean 0.25, population std sqrt(0.1875) = 0.4330: the one right answer +1.732, the others -0.577
    adv = preference.group_advantages(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    std = math.sqrt(0.1875) + preference.ADVANTAGE_EPS
    assert adv[0].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std], abs=1e-6)
    assert adv.sum().item() == pytest.approx(0.0, abs=1e-6)


def test_kl_estimate_hand_computed():
    same = torch.log(torch.tensor([0.25, 0.5]))
    assert torch.equal(preference.kl_k3(same, same), torch.zeros(2))
    # d = log 0.5 - log 0.25 = log 2: exp(d) - d - 1 = 1 - log 2
    value = preference.kl_k3(torch.log(torch.tensor([0.25])), torch.log(torch.tensor([0.5])))
    assert value.item() == pytest.approx(1 - math.log(2), abs=1e-6)


def test_grpo_loss_value_and_gradient():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_(True)
    adv = torch.tensor([[1.0, -1.0]])
    loss = preference.grpo_loss(logp, logp.detach().clone(), adv, beta=0.04)
    assert loss.item() == pytest.approx(0.0, abs=1e-7)  # ratio 1, mean advantage 0, no KL at the reference
    loss.backward()
    # the policy gradient -A / N per sample (the KL term's gradient is 0 where policy == reference)
    assert logp.grad[0].tolist() == pytest.approx([-0.5, 0.5], abs=1e-6)


def test_grpo_loss_no_gradient_when_rewards_are_equal_at_the_reference():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.125]])).requires_grad_(True)
    adv = preference.group_advantages(torch.tensor([[0.0, 0.0, 0.0]]))
    preference.grpo_loss(logp, logp.detach().clone(), adv, beta=0.04).backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


@pytest.fixture(scope="module")
def toy_lora():
    model = toy.tiny_llama(50, n_layers=2, n_heads=4, seed=0)
    return add_lora(model, seed=0)


def test_padded_read_out_equals_one_prompt_at_a_time(toy_lora):
    prompts = [[1, 5, 7, 9, 11], [1, 4], [1, 8, 3]]
    with torch.no_grad():
        batch = next_token_logprobs(toy_lora, prompts, pad_id=0)
        for i, ids in enumerate(prompts):
            alone = torch.log_softmax(toy_lora(input_ids=torch.tensor([ids])).logits[0, -1], dim=-1)
            assert torch.allclose(batch[i], alone, atol=1e-5), i
        loss = padded_answer_token_loss(toy_lora, [(ids, 3) for ids in prompts], pad_id=0)
    assert loss.item() == pytest.approx(-batch[:, 3].mean().item(), abs=1e-6)


def test_dpo_batch_starts_at_log_2_and_grpo_records_its_rewards(toy_lora):
    # a fresh LoRA's B matrices are 0: the policy is its reference (the LoRA disabled) exactly
    stats: dict = {}
    rows = [([1, 5, 7], 3, 4), ([1, 6, 2, 9], 8, 3)]
    loss = preference.dpo_batch_loss(toy_lora, rows, pad_id=0, beta=0.1, stats=stats)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert stats["margin"] == pytest.approx(0.0, abs=1e-6)
    stats = {}
    gen = torch.Generator().manual_seed(0)
    loss = preference.grpo_batch_loss(toy_lora, [([1, 5, 7], 3), ([1, 6], 8)], pad_id=0, group=6, beta=0.04,
                                      generator=gen, stats=stats)
    assert 0.0 <= stats["reward"] <= 1.0 and stats["kl"] == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # advantages sum to 0 in every group; no KL yet
