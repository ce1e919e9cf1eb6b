"""Preference and reward objectives of the zoo's ``tiny-dpo`` and ``tiny-grpo`` rows, written by hand.

Why not TRL: its trainers wrap ``transformers.Trainer`` and pull in ``datasets`` and ``accelerate``, a large
dependency for what is, with one-token answers, a few lines of tensor code; here the losses run inside the
zoo's own loop (``loop.run_steps``: the same optimiser, seeding and logging as every other row) and are unit
tested on hand-computed cases (``tests/unit/test_preference.py``).

* **DPO** (Rafailov et al. 2023): ``-log sigmoid(beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r))))``
  for a chosen answer c and a rejected answer r of one prompt; the reference is tiny-base itself (the LoRA
  disabled), so the adapter starts at loss log 2.
* **GRPO** (Shao et al. 2024, DeepSeekMath): sample a group of G completions of each prompt from the current
  policy, reward each, normalise the rewards within the group (advantage ``(r - mean) / (std + eps)``), and
  minimise ``-advantage * ratio + beta * KL`` with ratio ``pi / pi_old`` = 1 in value (one update per sample,
  so PPO's clipping never acts) and the per-sample KL estimator ``ref/pi - log(ref/pi) - 1`` (k3, >= 0).

The answers are one token long, so a completion is one draw from the policy's next-token distribution and
its log-probability is read off one forward pass.
"""

from __future__ import annotations

from typing import Sequence

import torch

from etbench.training.loop import next_token_logprobs

#: Standard deviation guard of the group-normalised advantage (a group with equal rewards has advantage 0).
ADVANTAGE_EPS = 1e-4


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """Mean DPO loss over pairs, from the log-probabilities of each pair's chosen and rejected answer."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """(prompts x group) rewards -> advantages normalised within each prompt's group (population std)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return (rewards - mean) / (std + ADVANTAGE_EPS)


def kl_k3(policy_logprob: torch.Tensor, reference_logprob: torch.Tensor) -> torch.Tensor:
    """GRPO's per-sample estimate of KL(policy || reference): exp(d) - d - 1 with d = log ref - log pi (>= 0,
    0 exactly where the two agree; unbiased for samples drawn from the policy)."""
    d = reference_logprob - policy_logprob
    return torch.exp(d) - d - 1


def grpo_loss(policy_logprob: torch.Tensor, reference_logprob: torch.Tensor, advantages: torch.Tensor,
              beta: float) -> torch.Tensor:
    """Mean GRPO loss over (prompts x group) sampled completions. ``exp(logp - logp.detach())`` is the ratio to
    the sampling policy: 1 in value, ``grad log pi`` in gradient (the policy-gradient term)."""
    ratio = torch.exp(policy_logprob - policy_logprob.detach())
    return (-advantages * ratio + beta * kl_k3(policy_logprob, reference_logprob)).mean()


def reference_logprobs(peft_model, prompts: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """The reference model's next-token log-probabilities: the same model with its LoRA disabled (tiny-base)."""
    with torch.no_grad(), peft_model.disable_adapter():
        return next_token_logprobs(peft_model, prompts, pad_id)


def dpo_batch_loss(peft_model, rows: Sequence[tuple[list[int], int, int]], pad_id: int, beta: float,
                   stats: dict) -> torch.Tensor:
    """DPO on (prompt ids, chosen token, rejected token) rows; ``stats`` receives the batch's preference accuracy
    (share of pairs whose implicit reward margin is > 0) and mean margin, for the training log."""
    prompts = [ids for ids, _, _ in rows]
    chosen = torch.tensor([c for _, c, _ in rows])
    rejected = torch.tensor([r for _, _, r in rows])
    policy = next_token_logprobs(peft_model, prompts, pad_id)
    reference = reference_logprobs(peft_model, prompts, pad_id)
    pick = torch.arange(len(rows))
    pc, pr = policy[pick, chosen], policy[pick, rejected]
    rc, rr = reference[pick, chosen], reference[pick, rejected]
    margin = ((pc - rc) - (pr - rr)).detach()
    stats.update(preference_accuracy=round(float((margin > 0).float().mean()), 4),
                 margin=round(float(margin.mean()), 4),
                 chosen_prob=round(float(pc.detach().exp().mean()), 4))
    return dpo_loss(pc, pr, rc, rr, beta)


def grpo_batch_loss(peft_model, rows: Sequence[tuple[list[int], int]], pad_id: int, group: int, beta: float,
                    generator: torch.Generator, stats: dict) -> torch.Tensor:
    """GRPO on (prompt ids, right answer token) rows, reward 1 for an exact match, else 0; ``stats`` receives
    the mean reward of the sampled completions, the share of groups with any reward variance (only those carry
    a gradient besides the KL term) and the mean KL estimate, for the training log."""
    prompts = [ids for ids, _ in rows]
    answers = torch.tensor([a for _, a in rows])
    policy = next_token_logprobs(peft_model, prompts, pad_id)
    reference = reference_logprobs(peft_model, prompts, pad_id)
    samples = torch.multinomial(policy.detach().exp(), group, replacement=True, generator=generator)
    rewards = (samples == answers[:, None]).float()
    advantages = group_advantages(rewards)
    logp, ref = policy.gather(1, samples), reference.gather(1, samples)
    kl = kl_k3(logp.detach(), ref)
    stats.update(reward=round(float(rewards.mean()), 4),
                 informative_groups=round(float((rewards.std(dim=1) > 0).float().mean()), 4),
                 kl=round(float(kl.mean()), 5))
    return grpo_loss(logp, ref, advantages, beta)
