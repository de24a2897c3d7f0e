"""GRPO from scratch: fine-tune Qwen2.5-1.5B-Instruct on GSM8K with Group Relative Policy Optimization.

GRPO (DeepSeekMath, Shao et al. 2024, arXiv 2402.03300) is PPO without the critic. For every prompt it samples
a *group* of G completions, scores each with a rule-based reward, and uses how much better than its group a
completion did as the advantage of every one of its tokens, inside PPO's clipped objective with a KL penalty
that keeps the policy near a frozen reference model. Which GRPO this is (each settled where it is computed):
    A_i   = (r_i - mean(r_group)) / (std(r_group) + 1e-4), sample std (divisor G - 1); 0 for a group that agrees
    loss  = -(1/G) sum_i (1/|o_i|) sum_t [min(rho_t A_i, clip(rho_t, 1 - epsilon, 1 + epsilon) A_i) - beta KL_t]
    rho_t = pi_theta(o_t) / pi_old(o_t), pi_old the policy that sampled the batch (mu updates per batch);
    KL_t  the k3 estimate of KL(pi_theta || pi_ref); |o_i| counts the tokens up to and including the first EOS
The family since then changes one piece each, one flag each (see grpo_loss): Dr. GRPO, DAPO, GSPO, and for the
off-policy updates after the first of mu, CISPO, SAPO, two-sided clipping and DeepSeek-V3.2's KL and mask.

The lesson is sections 1-9, in order: GRPO and nothing else.
    1. prompts and answer extraction      4. per-token log-probs and the mask   7. evaluation
    2. rewards                            5. the GRPO loss                      8. a cold start (optional)
    3. group-relative advantages          6. rollouts: G completions a prompt   9. the training loop
Engineering A-D follow (memory, exact sampling, GPUs and processes, logs, checkpoints, signals, errors); no lesson
function calls them: they come in through named arguments and marked calls in the loop. 10. is the command line.

Shape letters used in comments: B prompts per step, G completions per prompt (num_generations),
N = B * G sequences, P prompt tokens (left-padded), T completion tokens, V vocabulary size.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import os
import pathlib
import random
import re
import resource
import shutil
import signal
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

# ================================================================================================
# 1. Prompts and answer extraction
# ================================================================================================
# The model is asked to think inside <reasoning> tags and answer inside <answer> tags; GSM8K's
# reference solutions end with "#### <answer>". Rewards compare the two.

SYSTEM_PROMPT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"


def build_prompt(tokenizer, question: str) -> str:
    """The text the model continues: system prompt + question in the model's own chat format.

    An instruct model was trained on its chat template; joining strings by hand gives it a format it
    never saw. add_generation_prompt=True ends the text with the assistant header, so the model's next
    token is the first token of its answer. Copy with: SYSTEM_PROMPT.
    """
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def extract_answer_from_model_output(text: str) -> str | None:
    """Content of the last <answer>...</answer> block, stripped; None when there is no <answer> tag,
    when the last one is never closed, or when the model copied the template's placeholder "...".

    >>> extract_answer_from_model_output("<reasoning>2+2</reasoning><answer> 4 </answer>")
    '4'
    """
    parts = text.split("<answer>")
    if len(parts) < 2 or "</answer>" not in parts[-1]:
        return None
    answer = parts[-1].split("</answer>")[0].strip()
    return None if answer == "..." else answer


def extract_answer_from_dataset(text: str) -> str | None:
    """GSM8K's final answer: the part after the '####' delimiter, stripped; None without it.

    >>> extract_answer_from_dataset("48/2 = <<48/2=24>>24\\n#### 72")
    '72'
    """
    return text.split("####", 1)[1].strip() if "####" in text else None


def numbers_in(text: str) -> list[float]:
    """Every number in text, in order, after dropping '$', '%' and thousands commas ("1,080" -> 1080).
    Copy with: import re.

    >>> numbers_in("$1,080.50 for 3 items")
    [1080.5, 3.0]
    """
    text = text.replace("$", "").replace("%", "")
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # a comma between a digit and exactly 3 digits
    return [float(m) for m in re.findall(r"[-+]?(?:\d+(?:\.\d+)?|\.\d+)", text)]  # sign, digits, decimals


def extract_single_number(text: str) -> float | None:
    """The number in text when it holds exactly one, else None. Copy with: import re; numbers_in.

    >>> extract_single_number("$1,080.50"), extract_single_number("3 or 4")
    (1080.5, None)
    """
    numbers = numbers_in(text)
    return numbers[0] if len(numbers) == 1 else None


def extract_last_number(text: str) -> float | None:
    """The last number in text, or None: lenient accuracy ("the answer is 72."). Copy with: import re; numbers_in."""
    numbers = numbers_in(text)
    return numbers[-1] if numbers else None


# ================================================================================================
# 2. Rewards: rule-based, checkable by string comparison, no reward model
# ================================================================================================
# GRPO needs only a number per completion. Here it is the sum of two rules: is the answer right
# (0 to 2.0), and is the format there (0 to 0.8).

FORMAT_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")


def correctness_reward(completions: list[str], answers: list[str]) -> list[float]:
    """2.0 if the <answer> content equals the reference answer as a string, 1.5 if it holds the same
    single number ("$1,080" for "1080"), else 0.0 (also for a missing or unclosed <answer>).
    Copy with: import re; extract_answer_from_model_output, extract_single_number, numbers_in.
    """
    rewards = []
    for completion, answer in zip(completions, answers, strict=True):
        predicted = extract_answer_from_model_output(completion)
        if predicted is None:
            rewards.append(0.0)
        elif predicted == answer:
            rewards.append(2.0)
        else:
            p, a = extract_single_number(predicted), extract_single_number(answer)
            rewards.append(1.5 if p is not None and p == a else 0.0)
    return rewards


def format_reward(completions: list[str]) -> list[float]:
    """0.2 for each of <reasoning>, </reasoning>, <answer>, </answer> that appears (0.0 to 0.8): a
    partial, per-tag reward leads the policy towards the format long before it writes all of it at once.
    Copy with: FORMAT_TAGS.
    """
    return [0.2 * sum(tag in completion for tag in FORMAT_TAGS) for completion in completions]


def combined_reward(completions: list[str], answers: list[str]) -> list[float]:
    """correctness (0 to 2.0) + format (0 to 0.8): the scalar reward r_i of each completion, 0 to 2.8.
    Copy with: import re; correctness_reward, format_reward, FORMAT_TAGS, extract_answer_from_model_output,
    extract_single_number, numbers_in.
    """
    return [c + f for c, f in zip(correctness_reward(completions, answers), format_reward(completions))]


# ================================================================================================
# 3. Group-relative advantages: the part of GRPO that replaces PPO's critic
# ================================================================================================
# PPO learns a value network to say how good a state is; GRPO asks instead how a completion did
# compared with the other completions of the same prompt.


def compute_group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """A_i = (r_i - mean_group(r)) / (std_group(r) + 1e-4), one advantage per completion.

    rewards: (N,) with N = B * G, the G completions of each prompt consecutive. std is the unbiased
    sample std (torch's default, divisor G - 1), so G must be at least 2. A group whose rewards are all
    equal carries no signal and gets exactly A = 0. Returns (N, 1), to broadcast over the T tokens.
    The worked example: rewards [1, 2, 3, 4, 5, 6] with G = 3 have group means 2 and 5 and stds 1,
    so A = [-1, 0, 1, -1, 0, 1] (up to the 1e-4).

    The variants change the divisor (the group mean is always subtracted), scale_rewards:
        "group"  std of the completion's own group + 1e-4 (DeepSeekMath; the default)
        "batch"  std of all N rewards + 1e-4: one scale, so a group whose rewards barely differ gets small A
        "none"   no division, A_i = r_i - mean_group(r) (Dr. GRPO, arXiv 2503.20783: dividing by the
                 group std up-weights questions that are nearly always or nearly never solved)
    Copy with: import torch.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)  # (N,)
    if num_generations < 2 or rewards.numel() % num_generations:
        raise ValueError(f"need num_generations >= 2 dividing {rewards.numel()} rewards, got {num_generations}")
    grouped = rewards.view(-1, num_generations)  # (B, G)
    mean = grouped.mean(dim=1, keepdim=True)  # (B, 1)
    # Equal groups are zeroed explicitly: the 1e-4 alone does not do it, because in float32 the mean of
    # eight 2.8s is one rounding step off 2.8, and that error divided by 1e-4 is an advantage of ~5e-3.
    all_equal = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)  # (B, 1)
    centered = torch.where(all_equal, 0.0, grouped - mean)  # (B, G)
    if scale_rewards == "group":
        advantages = centered / (grouped.std(dim=1, keepdim=True) + 1e-4)  # (B, G), unbiased std per group
    elif scale_rewards == "batch":
        advantages = centered / (rewards.std() + 1e-4)  # (B, G), unbiased std of all N
    elif scale_rewards == "none":
        advantages = centered  # (B, G)
    else:
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    return advantages.reshape(-1, 1)  # (N, 1)


# ================================================================================================
# 4. Per-token log-probabilities and the completion mask
# ================================================================================================
# The ratio and the KL of the loss are built from log pi(o_t | q, o_<t): the log-probability that a
# model gives to each token the policy actually sampled. One function computes it for the policy,
# the old policy and the reference model.


def selective_log_softmax(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[x] for one chosen token x per position.

    log p(x) = logit[x] / T - logsumexp(logits / T), the logsumexp one sequence at a time in float32.
    It equals torch.log_softmax(logits.float() / T, -1).gather(-1, token_ids[..., None])[..., 0] but
    never holds the (N, T, V) log-probabilities of every token. T is applied in float32: dividing bf16
    logits by T first would round logit / T (up to 0.013 in a log-prob at T = 0.7). Plain autograd.
    logits: (N, T, V), token_ids: (N, T) -> (N, T) float32. Copy with: import torch.
    """
    token_logits = logits.gather(dim=-1, index=token_ids.unsqueeze(-1)).squeeze(-1).float() / temperature  # (N, T)
    log_normalizers = torch.stack([torch.logsumexp(row.float() / temperature, dim=-1) for row in logits])  # (N, T)
    return token_logits - log_normalizers  # (N, T)


def compute_log_probs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      logits_to_keep: int, temperature: float = 1.0, log_softmax=selective_log_softmax) -> torch.Tensor:
    """log pi(o_t | q, o_<t) for the last `logits_to_keep` tokens of each sequence (the completion).

    input_ids, attention_mask: (N, P + T), prompt left-padded, completion after it; logits_to_keep = T.
    Returns (N, T) float32. The logits are divided by the sampling temperature: the completions were
    sampled from softmax(logits / temperature), and the ratio and KL must score that distribution.
    log_softmax(logits, token_ids, temperature) is selective_log_softmax; the training loop's LogProbModule
    (engineering B) passes InPlaceSelectiveLogSoftmax.apply (engineering A): the same values, no (N, T, V)
    extras in backward. Copy with: import torch; selective_log_softmax.
    """
    # Positions count real tokens only, as generate() numbered them: left padding must not shift them.
    position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (N, P + T)
    # The logit at position t scores the token at t + 1. The completion is the last T tokens, at positions
    # L-T .. L-1 (L = P + T), so its scores are the logits at positions L-T-1 .. L-2. logits_to_keep takes
    # those indices: the LM head runs on T positions, not P + T, and no slice of the logits is copied.
    keep = torch.arange(input_ids.size(1) - logits_to_keep - 1, input_ids.size(1) - 1, device=input_ids.device)  # (T,)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=keep, use_cache=False).logits  # (N, T, V); one full pass: no KV cache to build
    return log_softmax(logits, input_ids[:, -logits_to_keep:], temperature)  # (N, T), scoring the completion


def create_completion_mask(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 for every completion token up to and including the first end-of-sequence token, 0 after it.

    The first EOS is included: choosing to stop is an action the policy must get credit for. Tokens
    after it are padding. Masking by comparing to the pad id would be wrong, because Qwen2.5's pad
    token <|endoftext|> is also one of its end-of-turn tokens. A completion with no EOS (cut at the
    length limit) keeps all its tokens. completion_ids: (N, T) -> (N, T) int64. Copy with: import torch.
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device)).long()  # (N, T)
    eos_before = is_eos.cumsum(dim=1) - is_eos  # (N, T): how many EOS tokens come before each token
    return (eos_before == 0).long()  # (N, T): kept up to and including the first EOS


def truncated_completions(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """True for each completion without an end-of-sequence token, cut at the length limit: (N, T) -> (N,) bool.
    Copy with: import torch."""
    return ~torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device)).any(dim=1)  # (N,)


# ================================================================================================
# 5. The GRPO loss
# ================================================================================================


def masked_sequence_mean(values: torch.Tensor, mask: torch.Tensor, per_sequence: bool = False) -> torch.Tensor:
    """mean over sequences of the mean over each sequence's unmasked tokens: (N, T), (N, T) -> scalar (per_sequence:
    the (N, 1) means themselves). Every completion weighs the same whatever its length (the paper's
    1/G sum_i 1/|o_i| sum_t). Copy with: import torch."""
    means = (values * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)  # (N, 1)
    return means if per_sequence else means.mean()


# The loss types that average over all the step's tokens (TRL's "dapo" and "cispo"); the others over sequences.
TOKEN_MEAN_LOSSES = ("dapo", "cispo")


def reduce_per_token(values: torch.Tensor, mask: torch.Tensor, loss_type: str,
                     max_completion_length: int | None = None) -> torch.Tensor:
    """One number from per-token values (N, T) under mask (N, T), the way loss_type averages them:
        "grpo"     mean_i [ sum_t mask_it v_it / sum_t mask_it ]   each completion weighs the same, so
                   a token of a long completion counts less (DeepSeekMath); "sapo" too (as TRL)
        "dapo"     sum_it mask_it v_it / sum_it mask_it            every token weighs the same (DAPO,
                   arXiv 2503.14476); TRL's default; "cispo" too (as TRL): TOKEN_MEAN_LOSSES
        "dr_grpo"  sum_it mask_it v_it / (N * max_completion_length)   a constant divisor: no length
                   bias at all (Dr. GRPO, arXiv 2503.20783)
    Copy with: import torch; masked_sequence_mean, TOKEN_MEAN_LOSSES.
    """
    if loss_type in ("grpo", "sapo"):
        return masked_sequence_mean(values, mask)
    if loss_type in TOKEN_MEAN_LOSSES:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' divides by max_completion_length: pass it")
        return (values * mask).sum() / (mask.size(0) * max_completion_length)
    raise ValueError(f"loss_type must be 'grpo', 'dapo', 'dr_grpo', 'cispo' or 'sapo', got {loss_type!r}")


def grpo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, ref_log_probs: torch.Tensor | None,
              advantages: torch.Tensor, completion_mask: torch.Tensor, beta: float, epsilon: float,
              epsilon_high: float | None = None, loss_type: str = "grpo", importance_sampling_level: str = "token",
              max_completion_length: int | None = None, delta: float | None = None, sapo_temperature_pos: float = 1.0,
              sapo_temperature_neg: float = 1.05, use_bias_correction_kl: bool = False,
              off_policy_mask_threshold: float | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO objective with a k3 KL penalty, negated so that minimising it is ascent.

    Per token t of completion i, with p = log pi_theta, p_old = log pi_old, q = log pi_ref:
        rho     = exp(p - p_old)
        surr    = min(rho * A_i, clip(rho, 1 - epsilon, 1 + epsilon) * A_i)
        KL      = exp(q - p) - (q - p) - 1            (k3: >= 0, expectation KL(pi_theta || pi_ref))
        obj_t   = surr - beta * KL
    loss = - mean_i [ sum_t mask_it * obj_t / sum_t mask_it ]

    With the defaults that is DeepSeekMath's GRPO. The later variants, one argument each:
        epsilon_high               DAPO's clip-higher: rho is clipped to [1 - epsilon, 1 + epsilon_high]
                                   (None: epsilon), so unlikely tokens with A > 0 can grow further
        importance_sampling_level  "sequence" (GSPO, arXiv 2507.18071): every token of completion i uses
                                   s_i = exp( sum_t mask_it (p - p_old) / sum_t mask_it ), one ratio for
                                   the whole sequence, in both terms of the min; the KL stays per token
        loss_type                  how obj_t is averaged: "grpo" as above, "dapo" over all tokens,
                                   "dr_grpo" over N * max_completion_length (see reduce_per_token);
                                   "cispo" (averaged as "dapo") and "sapo" (as "grpo") change surr, below
    The rest act where rho != 1, in the off-policy updates after the first of mu: at rho = 1 cispo's and sapo's surr
    have GRPO's gradient, delta and the mask do nothing (the unbiased KL still changes the KL's gradient). sg() is a
    stop-gradient (detach); at sequence level s_i stands in for rho throughout.
        loss_type "cispo"          MiniMax-M1 (arXiv 2506.13585): surr = sg(min(rho, 1 + epsilon_high)) * A_i * p:
                                   the capped ratio only weighs the gradient of p, so no token loses its gradient
                                   to the clip (epsilon only as epsilon_high's default). The cap is the paper's
                                   1 + epsilon_high; TRL's is epsilon_high itself (TRL's 5.0 is 4.0 here)
        loss_type "sapo"           SAPO (arXiv 2511.20347): surr = sigmoid(tau (rho - 1)) * 4 / tau * A_i, tau =
                                   sapo_temperature_pos if A_i > 0 else sapo_temperature_neg: a smooth trust region,
                                   the gradient 4 s (1 - s) rho A_i grad p (s the sigmoid) fading as rho leaves 1
        delta                      INTELLECT-2 (arXiv 2505.07291), in the clipped min: surr = min(min(rho, delta)
                                   * A_i, clip(rho, 1 - epsilon, 1 + epsilon_high) * A_i), so a token with A_i < 0
                                   and a huge rho counts delta * A_i, not rho * A_i, and gets no gradient
        use_bias_correction_kl     DeepSeek-V3.2 (arXiv 2512.02556): KL = rho * k3, rho with its gradient (as TRL):
                                   the tokens were sampled from pi_old, and E_old[rho k3] = E_theta[k3]
        off_policy_mask_threshold  DeepSeek-V3.2: surr = 0 for completion i if A_i < 0 and
                                   sum_t mask_it (p_old - sg(p)) / sum_t mask_it > threshold (a bad completion the
                                   policy has already moved away from); its KL and the divisors stay (paper, TRL)

    log_probs: (N, T) with gradient; old_log_probs, ref_log_probs: (N, T) without (ref None when beta == 0);
    advantages: (N, 1); completion_mask: (N, T). Returns the loss and detached metrics, means over sequences of
    per-sequence token means: kl (as in the loss); clip_ratio_low / _high, the share of tokens clipped below
    (rho < 1 - epsilon, A < 0) / above (rho > 1 + epsilon_high, A > 0), which get no gradient (0 for cispo and
    sapo, which drop none; delta's not counted), clip_ratio, their sum; cispo_clip_ratio, the share of tokens
    whose weight cispo capped (any A; TRL's counts A > 0 only); off_policy_masked, the completions dropped.
    Copy with: import torch; reduce_per_token, masked_sequence_mean, TOKEN_MEAN_LOSSES.
    """
    assert log_probs.shape == old_log_probs.shape == completion_mask.shape, "(N, T) tensors expected"
    assert advantages.shape == (log_probs.size(0), 1), "advantages must be (N, 1)"
    assert beta == 0.0 or ref_log_probs is not None, "beta > 0 needs the reference log-probs"
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = completion_mask.to(log_probs.dtype)  # (N, T)

    log_ratio = log_probs - old_log_probs  # (N, T)
    if importance_sampling_level == "sequence":  # GSPO: the mean log-ratio of each completion
        log_ratio = masked_sequence_mean(log_ratio, mask, per_sequence=True)  # (N, 1)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)  # (N, T), or (N, 1) at sequence level
    if loss_type == "cispo":  # the capped ratio, detached, weighs the gradient of log pi_theta
        surrogate = torch.clamp(ratio, max=1.0 + epsilon_high).detach() * advantages * log_probs  # (N, T)
    elif loss_type == "sapo":  # a smooth gate in place of the clip; a separate temperature for A <= 0
        tau = torch.full_like(advantages, sapo_temperature_neg)  # (N, 1): tau_neg for A <= 0
        tau = tau.masked_fill(advantages > 0, sapo_temperature_pos)  # (N, 1): tau_pos for A > 0
        surrogate = (torch.sigmoid(tau * (ratio - 1.0)) * 4.0 / tau * advantages).expand_as(log_probs)  # (N, T)
    else:
        unclipped = (ratio if delta is None else torch.clamp(ratio, max=delta)) * advantages  # (N, T) or (N, 1)
        clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon_high) * advantages  # (N, T) or (N, 1)
        surrogate = torch.min(unclipped, clipped).expand_as(log_probs)  # (N, T)
    if off_policy_mask_threshold is not None:  # how far, on average, p has fallen below p_old on completion i
        drift = masked_sequence_mean(old_log_probs - log_probs.detach(), mask, per_sequence=True)  # (N, 1)
        dropped = (advantages < 0) & (drift > off_policy_mask_threshold)  # (N, 1)
        surrogate = surrogate * ~dropped  # (N, T)
    log_ratio_ref = ref_log_probs - log_probs if beta != 0.0 else torch.zeros_like(log_probs)  # (N, T): q - p
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1.0  # (N, T), 0 without a reference model
    if use_bias_correction_kl and beta != 0.0:  # the tokens came from pi_old: weigh each by rho
        kl = kl * ratio  # (N, T)
    objective = surrogate - beta * kl  # (N, T)
    loss = -reduce_per_token(objective, mask, loss_type, max_completion_length)
    clips = loss_type not in ("cispo", "sapo")  # only the clipped min drops a token's gradient
    clipped_low = ((ratio < 1.0 - epsilon) & (advantages < 0) & clips).expand_as(mask).to(mask.dtype)  # (N, T)
    clipped_high = ((ratio > 1.0 + epsilon_high) & (advantages > 0) & clips).expand_as(mask).to(mask.dtype)  # (N, T)
    per_token = {"kl": kl.detach(), "clip_ratio_low": clipped_low, "clip_ratio_high": clipped_high}  # (N, T) each
    if loss_type == "cispo":
        per_token["cispo_clip_ratio"] = (ratio > 1.0 + epsilon_high).expand_as(mask).to(mask.dtype)  # (N, T)
    metrics = {name: masked_sequence_mean(values, mask) for name, values in per_token.items()}
    metrics["clip_ratio"] = metrics["clip_ratio_low"] + metrics["clip_ratio_high"]
    if off_policy_mask_threshold is not None:
        metrics["off_policy_masked"] = dropped.to(mask.dtype).mean()
    return loss, metrics


# ================================================================================================
# 6. Rollouts: sampling G completions per prompt
# ================================================================================================
# The ratio and the KL score each completion under softmax(logits / temperature), so it must be sampled
# from exactly that: generate()'s sampling at that temperature, with the filters the checkpoint ships
# switched off (Qwen2.5-Instruct's generation_config sets top_k 20, top_p 0.8 and a repetition penalty).


def sample_sequences(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                     temperature: float | None, eos_token_ids: list[int], pad_token_id: int) -> torch.Tensor:
    """model.generate() with the KV cache: prompts (n, P) -> prompts + completions (n, P + t), t <= max_new_tokens.

    temperature T: each new token is drawn from exactly softmax(logits / T). With the checkpoint's top_k 20 a
    token outside the top 20 could never be sampled though the log-probs give it mass: the ratio's pi_old
    would not be the policy that sampled. None: greedy decoding (evaluation). The training loop swaps in
    Parallel.generate (engineering B): the same distribution, drawn from random numbers fixed up front.
    Copy with: import torch.
    """
    # use_cache: the KV cache, each new token attends to stored keys/values (O(T), not O(T^2) per token).
    common = dict(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                  repetition_penalty=1.0, eos_token_id=eos_token_ids, pad_token_id=pad_token_id, use_cache=True)
    if temperature is None:
        return model.generate(**common, do_sample=False)  # (n, P + t): greedy
    return model.generate(**common, do_sample=True, temperature=temperature, top_k=0, top_p=1.0)  # (n, P + t)


def end_of_sequence_ids(model: torch.nn.Module, tokenizer) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS and all of the model's
    generation_config eos ids (Qwen2.5-Instruct: <|im_end|> and <|endoftext|>). Copy with: import torch."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def generate_completions(model, tokenizer, prompts: list[str], num_generations: int, max_new_tokens: int,
                         temperature: float | None, eos_token_ids: list[int], generate=sample_sequences):
    """Sample num_generations completions for each prompt in one batched generate call.

    Each prompt is repeated G times back to back, so the G completions of a prompt are consecutive, as
    compute_group_advantages expects. Prompts are left-padded so that every completion starts at the
    same column P. generate(model, prompt_ids, prompt_mask, **settings) is sample_sequences; the training
    loop passes Parallel.generate (engineering B): the same distribution, the work spread out.
    Returns prompt_ids, prompt_mask (N, P) and completion_ids, completion_mask (N, T), T the longest's length.
    Copy with: import torch; sample_sequences, create_completion_mask.
    """
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    prompt_ids = encoded["input_ids"].repeat_interleave(num_generations, dim=0).to(device)  # (N, P)
    prompt_mask = encoded["attention_mask"].repeat_interleave(num_generations, dim=0).to(device)  # (N, P)
    with torch.no_grad():
        sequences = generate(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,  # (N, P + t)
                             temperature=temperature, eos_token_ids=eos_token_ids, pad_token_id=tokenizer.pad_token_id)
    completion_ids = sequences[:, prompt_ids.size(1):]  # (N, t)
    completion_mask = create_completion_mask(completion_ids, eos_token_ids)  # (N, t)
    longest = max(int(completion_mask.sum(dim=1).max()), 1)
    return prompt_ids, prompt_mask, completion_ids[:, :longest], completion_mask[:, :longest]


def decode_completions(tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[str]:
    """The text of each completion, up to its first EOS, without special tokens. Copy with: import torch."""
    rows = [ids[:n] for ids, n in zip(completion_ids.tolist(), completion_mask.sum(dim=1).tolist())]
    return tokenizer.batch_decode(rows, skip_special_tokens=True)


# ================================================================================================
# 7. Evaluation: greedy answers to held-out questions
# ================================================================================================


def evaluate_model(model, tokenizer, examples: list[dict], *, max_new_tokens: int, batch_size: int,
                   label: str = "eval", generate=sample_sequences) -> dict:
    """Greedy-decoding accuracy on held-out examples, in batches of batch_size prompts.

    strict_accuracy: the <answer> content is right (correctness_reward > 0), the format the training rewards;
    lenient_accuracy: the last number anywhere in the completion equals the answer, which credits a right answer
    given without the tags. generate: as in generate_completions. Copy with: import re, time, torch; build_prompt,
    SYSTEM_PROMPT, end_of_sequence_ids, sample_sequences, generate_completions, create_completion_mask,
    decode_completions, correctness_reward, extract_last_number, extract_answer_from_model_output,
    extract_single_number, numbers_in.
    """
    was_training = model.training
    model.eval()
    eos_ids = end_of_sequence_ids(model, tokenizer)
    strict = lenient = 0
    start_time = time.perf_counter()
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        prompts = [build_prompt(tokenizer, ex["question"]) for ex in batch]
        answers = [ex["answer"] for ex in batch]
        _, _, completion_ids, completion_mask = generate_completions(
            model, tokenizer, prompts, 1, max_new_tokens, None, eos_ids, generate)
        texts = decode_completions(tokenizer, completion_ids, completion_mask)
        strict += sum(r > 0 for r in correctness_reward(texts, answers))
        for text, answer in zip(texts, answers):
            predicted, expected = extract_last_number(text), extract_single_number(answer)
            lenient += predicted is not None and predicted == expected
        done = start + len(batch)
        print(f"\r{label}: {done}/{len(examples)}  strict {strict / done:.1%}  lenient {lenient / done:.1%}",
              end="" if done < len(examples) else "\n", flush=True)
    model.train(was_training)
    n = max(len(examples), 1)
    return {"strict_accuracy": strict / n, "lenient_accuracy": lenient / n,
            "num_examples": len(examples), "seconds": round(time.perf_counter() - start_time, 2)}


# ================================================================================================
# 8. A cold start: supervised steps on worked solutions, for a model that never earns a reward
# ================================================================================================
# GRPO learns only from differences within a group: a model that never writes the <answer> tags earns 0 every
# time, every advantage is 0, and it learns nothing. DeepSeek-R1's RL began from a "cold start": supervised steps
# on worked solutions in the wanted format, their log-likelihood from compute_log_probs, as for pi, pi_old, pi_ref.


def sft_completion(solution: str, answer: str) -> str:
    """A worked solution in the rewarded format: its calculator notes (GSM8K's <<48/2=24>>) removed, inside
    <reasoning> tags, then the final answer inside <answer> tags. Copy with: import re."""
    reasoning = re.sub(r"<<[^>]*>>", "", solution).strip()
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>"


def sft_loss(model, tokenizer, prompts: list[str], completions: list[str]) -> torch.Tensor:
    """Mean negative log-likelihood of n completions after their prompts, each ended by the end-of-turn token:
        loss = -(1 / sum_it m_it) sum_it m_it log pi(o_it | q_i, o_i,<t)
    every token of the batch weighing the same (m: 1 on a completion's tokens and its end-of-turn token, 0 on
    padding), at temperature 1. prompts: build_prompt's texts. Copy with: import torch; selective_log_softmax,
    compute_log_probs."""
    device = next(model.parameters()).device
    prompt = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    target = tokenizer([text + tokenizer.eos_token for text in completions], return_tensors="pt", padding=True,
                       padding_side="right", add_special_tokens=False)  # (n, T), padding after the end-of-turn
    input_ids = torch.cat([prompt["input_ids"], target["input_ids"]], dim=1).to(device)  # (n, P + T)
    attention_mask = torch.cat([prompt["attention_mask"], target["attention_mask"]], dim=1).to(device)  # (n, P + T)
    log_probs = compute_log_probs(model, input_ids, attention_mask, target["input_ids"].size(1))  # (n, T)
    mask = target["attention_mask"].to(device)  # (n, T): m
    return -(log_probs * mask).sum() / mask.sum()


def cold_start(model, tokenizer, examples: list[dict], *, steps: int, batch_size: int, learning_rate: float,
               seed: int) -> list[float]:
    """`steps` AdamW steps on sft_loss, batch_size examples ("question", "answer", "solution") each, in a seeded
    random order; returns the losses. Its AdamW is dropped at the end: GRPO's fresh one is not damped by the second
    moments of the far larger supervised gradients. Copy with: import re, torch; build_prompt, SYSTEM_PROMPT,
    sft_completion, sft_loss, selective_log_softmax, compute_log_probs."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    losses = []
    for step in range(steps):
        batch = [examples[order[(step * batch_size + i) % len(order)]] for i in range(batch_size)]
        loss = sft_loss(model, tokenizer, [build_prompt(tokenizer, ex["question"]) for ex in batch],
                        [sft_completion(ex["solution"], ex["answer"]) for ex in batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        print(f"cold start step {step + 1}/{steps}: loss {losses[-1]:.4f}", flush=True)
    return losses


# ================================================================================================
# 9. The training loop
# ================================================================================================


def batch_indices(step: int, batch_size: int, num_examples: int, seed: int) -> list[int]:
    """The example indices of step `step` (0-based): consecutive slices of a fresh random permutation per
    pass over the data; a pure function of its arguments, so a run is reproducible and resumable.
    Copy with: import torch."""
    indices, permutations = [], {}
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, num_examples)
        if epoch not in permutations:  # a batch spans at most two passes
            permutations[epoch] = torch.randperm(num_examples, generator=torch.Generator().manual_seed(seed + epoch))
        indices.append(int(permutations[epoch][offset]))
    return indices


def make_reference_model(policy: torch.nn.Module, dtype: torch.dtype | None) -> torch.nn.Module:
    """A frozen copy of the policy: eval mode, no gradients, its weights optionally cast (bf16 on GPU
    halves it). Only the weights: model.to(bfloat16) would also round Qwen2's rotary inv_freq, and the
    reference would see other positions than the policy (off by up to 0.69 rad at position 599).
    Copy with: import copy, torch."""
    reference = copy.deepcopy(policy)
    if dtype is not None:
        for param in reference.parameters():
            param.data = param.data.to(dtype)
    return reference.eval().requires_grad_(False)


def make_optimizer(policy: torch.nn.Module, learning_rate: float, weight_decay: float,
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the policy's weights. On GPU its fused kernel: the default (foreach) one allocates a
    temporary as large as the weights at every step (+5.75 GiB for the 1.5B model). Copy with: import torch."""
    return torch.optim.AdamW(policy.parameters(), lr=learning_rate, weight_decay=weight_decay,
                             fused=True if device.type == "cuda" else None)


def micro_batches(num_sequences: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` sequences covering range(num_sequences): the rows of (N, ...) tensors."""
    return [slice(start, min(start + size, num_sequences)) for start in range(0, num_sequences, size)]


def accumulate_grpo_gradients(log_prob_fn, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                              completion_mask: torch.Tensor, advantages: torch.Tensor,
                              old_log_probs: torch.Tensor | None, ref_log_probs: torch.Tensor | None,
                              micro_batch_size: int, beta: float, epsilon: float, batch_tokens: float | None = None,
                              no_sync=None, **variant) -> tuple[torch.Tensor, dict]:
    """Backpropagate the GRPO loss of a whole batch, a micro-batch of sequences at a time.

    The loss is an average over the batch, so each micro-batch's loss is weighted by its share of that
    average: n / N for n sequences when the loss averages over sequences ("grpo", "dr_grpo", "sapo"),
    its completion tokens / the batch's when it averages over tokens (TOKEN_MEAN_LOSSES). The gradients
    accumulated in .grad are then the full batch's, while only one micro-batch's (n, T, V) logits exist at a time.
    old_log_probs None: the policy has not moved since the rollout (the first of the mu updates), so
    this pass's own detached log-probs are pi_old's (rho = 1), with no extra forward pass.

    log_prob_fn(input_ids, attention_mask, T) -> (n, T), with gradient: e.g.
    functools.partial(compute_log_probs, policy, temperature=T); input_ids, attention_mask: (N, P + T);
    completion_mask (the tokens that get a loss), old and ref log-probs: (N, T); advantages: (N, 1);
    variant: grpo_loss's keywords. batch_tokens: what "dapo", "cispo" divide by (default completion_mask.sum()).
    no_sync: DistributedDataParallel's, to average the gradients once per update, with the last one.
    Returns this pass's detached log-probs (N, T) and the batch's loss and grpo_loss's metrics (detached).
    Copy with: from contextlib import nullcontext; import torch; grpo_loss, reduce_per_token, masked_sequence_mean,
    TOKEN_MEAN_LOSSES, micro_batches.
    """
    num_sequences, num_completion_tokens = completion_mask.shape  # N, T
    if batch_tokens is None:
        batch_tokens = completion_mask.sum().item()
    log_probs_seen = torch.empty(num_sequences, num_completion_tokens, device=completion_mask.device)  # (N, T)
    totals = {"loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "clip_ratio_low": 0.0, "clip_ratio_high": 0.0}
    for c in micro_batches(num_sequences, micro_batch_size):
        average_now = no_sync is None or c.stop == num_sequences  # DDP: once per update, with the last
        with nullcontext() if average_now else no_sync():
            log_probs = log_prob_fn(input_ids[c], attention_mask[c], num_completion_tokens)  # (n, T)
            log_probs_seen[c] = log_probs.detach()
            old = log_probs_seen[c] if old_log_probs is None else old_log_probs[c]  # (n, T)
            loss, metrics = grpo_loss(log_probs, old, None if ref_log_probs is None else ref_log_probs[c],
                                      advantages[c], completion_mask[c], beta, epsilon, **variant)
            share = (c.stop - c.start) / num_sequences  # of the sequences; "dapo", "cispo": of the tokens
            token_mean = variant.get("loss_type") in TOKEN_MEAN_LOSSES
            weight = completion_mask[c].sum() / max(batch_tokens, 1.0) if token_mean else share
            (loss * weight).backward()  # frees this micro-batch's graph before the next one is built
        totals["loss"] += loss.detach() * weight
        for name, value in metrics.items():  # cispo_clip_ratio, off_policy_masked: only where they apply
            totals[name] = totals.get(name, 0.0) + value * share
    return log_probs_seen, totals


def step_metrics(texts: list[str], answers: list[str], rewards: torch.Tensor, truncated: torch.Tensor,
                 completion_mask: torch.Tensor, attention_mask: torch.Tensor, num_generations: int,
                 updates: list[dict], seconds: dict) -> dict:
    """The numbers that tell whether RL is working, for one step (the README's table explains each).
    texts, answers: the N completions and their reference answers; rewards: (N,); truncated: (N,) bool;
    completion_mask (N, T) and attention_mask (N, P + T) count tokens; updates: one dict per policy
    update (a skipped one's loss is NaN, and so is the mean); seconds: rollout, update and step time.
    Copy with: import re, torch; correctness_reward, format_reward, FORMAT_TAGS, extract_answer_from_model_output,
    extract_single_number, numbers_in."""
    grouped = rewards.view(-1, num_generations)  # (B, G)
    tokens = completion_mask.sum().item()
    means = {name: sum(float(u[name]) for u in updates) / len(updates) for name in updates[0] if name != "skipped"}
    return {
        "reward": rewards.mean().item(),
        "correctness_reward": torch.tensor(correctness_reward(texts, answers)).mean().item(),
        "format_reward": torch.tensor(format_reward(texts)).mean().item(),
        "reward_std": grouped.std(dim=1).mean().item(),
        "frac_reward_zero_std": (grouped.amax(dim=1) == grouped.amin(dim=1)).float().mean().item(),
        **means,
        "skipped_updates": sum(u["skipped"] for u in updates),
        "completion_length": tokens / len(texts),
        "truncated_ratio": truncated.float().mean().item(),
        **{f"{name}_seconds": seconds[name] for name in ("step", "rollout", "update")},
        "tokens_per_second": tokens / seconds["step"],  # completion tokens
        "generation_tokens_per_second": tokens / seconds["rollout"],
        "train_tokens_per_second": len(updates) * attention_mask.sum().item() / seconds["update"],  # all, x mu
    }


def train_with_grpo(
    policy: nn.Module, tokenizer, examples: list[dict], *,
    num_iterations: int = 1, num_steps: int = 500, batch_size: int = 7, num_generations: int = 4, mu: int = 3,
    max_completion_length: int = 400, temperature: float = 1.0, beta: float = 0.04, epsilon: float = 0.2,
    learning_rate: float = 5e-6, weight_decay: float = 0.01, max_grad_norm: float = 0.1,
    micro_batch_size: int = 4, bf16: bool = True, seed: int = 42, scale_rewards: str = "group",
    mask_truncated_completions: bool = False, eval_examples: list[dict] = (), eval_steps: int = 0,
    eval_batch_size: int = 32, parallel: Parallel | None = None, run: RunControl | None = None, **variant,
) -> list[dict]:
    """Train `policy` in place with GRPO; returns one metrics dict per step.

    num_iterations outer iterations, each starting with a fresh reference model copied from the policy;
    num_steps steps of batch_size prompts x num_generations completions; mu AdamW updates per step, pi_old
    being the policy that sampled the step's completions; micro_batch_size sequences per forward/backward
    pass; bf16: autocast and a bf16 reference model, on GPU only. The later GRPOs: scale_rewards (see
    compute_group_advantages), mask_truncated_completions (DAPO: no loss for a completion cut at the limit) and
    variant, grpo_loss's keywords (loss_type, epsilon_high, importance_sampling_level, delta, ...), passed on.
    eval_steps: every this many steps, evaluate_model on eval_examples (0: never), kept in the step's record.
    parallel (engineering B) spreads the work out, run (engineering C) logs, saves, resumes and stops: each
    marked call in the loop says the lesson's one-process call it stands for."""
    device = next(policy.parameters()).device
    amp_dtype = torch.bfloat16 if bf16 and device.type == "cuda" else None
    parallel = parallel or Parallel(device=device, autocast_dtype=amp_dtype)  # engineering B: one process
    run = run or RunControl()  # engineering C: print only, no files
    eos_ids = end_of_sequence_ids(policy, tokenizer)
    optimizer = make_optimizer(policy, learning_rate, weight_decay, device)
    variant["max_completion_length"] = max_completion_length  # what grpo_loss's "dr_grpo" divides by
    total_steps, history = num_iterations * num_steps, []
    first_step, reference = run.start(optimizer, policy, amp_dtype, beta, total_steps, mu)  # C: = 0, None (new run)

    for step in range(first_step, total_steps):  # step: 0-based global step
        started = time.perf_counter()
        # 1) Take B prompts. An iteration starts with a new reference model pi_ref: a frozen copy of the
        #    policy as it is now, which the KL term keeps the policy close to (none is needed when beta = 0).
        if beta != 0.0 and step % num_steps == 0:
            reference = run.reference_model(policy, amp_dtype)  # C: = make_reference_model(...); LoRA: shared W
        batch = [examples[i] for i in batch_indices(step, batch_size, len(examples), seed)]
        prompts = [build_prompt(tokenizer, ex["question"]) for ex in batch]
        answers = [ex["answer"] for ex in batch for _ in range(num_generations)]  # N: one per completion

        # 2) Roll out G completions per prompt with the current policy, which is therefore pi_old for
        #    this step. eval() turns off dropout and gradient checkpointing while generating.
        policy.eval()
        prompt_ids, prompt_mask, completion_ids, completion_mask = generate_completions(  # (N, P) x 2, (N, T) x 2
            policy, tokenizer, prompts, num_generations, max_completion_length, temperature, eos_ids,
            generate=parallel.generate)  # B: = generate=sample_sequences, spread over GPUs and processes
        texts = decode_completions(tokenizer, completion_ids, completion_mask)
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (N, P + T): what the log-prob passes read
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)  # (N, P + T)
        rollout_seconds = time.perf_counter() - started

        # 3) Score: each completion's reward r_i, then its advantage A_i relative to its own group.
        rewards = torch.tensor(combined_reward(texts, answers))  # (N,): r_i, correctness + format
        advantages = compute_group_advantages(rewards, num_generations, scale_rewards).to(device)  # (N, 1)
        truncated = truncated_completions(completion_ids, eos_ids)  # (N,): cut off at the length limit
        # loss_mask (N, T): the tokens that get a loss (DAPO's overlong filtering: none for an unfinished one)
        loss_mask = completion_mask * ~truncated.unsqueeze(1) if mask_truncated_completions else completion_mask

        # 4) The reference model's log-probs of the same tokens, once per step: the KL anchor.
        # B: = compute_log_probs(reference, input_ids, attention_mask, T, temperature) in torch.no_grad()
        ref_log_probs = None if reference is None else parallel.log_probs(
            reference, input_ids, attention_mask, completion_ids.size(1), temperature, micro_batch_size)  # (N, T)

        # 5) mu policy updates on this one batch of rollouts. pi_old stays the policy that sampled them:
        #    the first update computes its log-probs anyway (the policy has not moved yet), so those,
        #    detached, are recorded as old_log_probs for the updates after it: no extra forward pass.
        update_start = time.perf_counter()
        policy.train()
        old_log_probs, updates = None, []  # None: the first update uses its own log-probs
        for update in range(mu):
            # B: = accumulate_grpo_gradients(partial(compute_log_probs, policy, temperature=temperature), ...)
            log_probs, totals = parallel.grpo_gradients(
                policy, input_ids, attention_mask, loss_mask, advantages, old_log_probs, ref_log_probs,
                micro_batch_size, beta, epsilon, temperature, **variant)  # log_probs: (N, T), detached
            if update == 0:
                old_log_probs = log_probs  # log pi_old, recorded by the first update
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm)
            # A NaN or inf would poison the weights and AdamW's moments for good: skip that update.
            skipped = not (torch.isfinite(grad_norm).item() and math.isfinite(totals["loss"]))
            if not skipped:
                optimizer.step()
            optimizer.zero_grad(set_to_none=False)  # keeps the gradients' memory (under DDP: its buckets)
            updates.append({**totals, "grad_norm": grad_norm.item(), "skipped": skipped})

        # 6) The step's numbers; every eval_steps steps, a point of the held-out curve (greedy, no randomness).
        now = time.perf_counter()
        seconds = {"rollout": rollout_seconds, "update": now - update_start, "step": now - started}
        history.append({"step": step + 1, "iteration": step // num_steps + 1, **step_metrics(
            texts, answers, rewards, truncated, completion_mask, attention_mask, num_generations, updates, seconds)})
        if eval_steps and (step + 1) % eval_steps == 0 and eval_examples:
            history[-1]["eval"] = evaluate_model(policy, tokenizer, eval_examples, max_new_tokens=max_completion_length,
                                                 batch_size=eval_batch_size, label=f"eval step {step + 1}",
                                                 generate=parallel.generate)  # B: = generate=sample_sequences

        # 7) Log the step, save a checkpoint when one is due, and stop here if a signal or faults ask for it.
        run.end_step(history[-1], (batch[0]["question"], texts[0], answers[0], rewards[0].item()),
                     policy, tokenizer, optimizer, reference)  # C: = print(step_line(...)), metrics.jsonl, checkpoint

    print_run_summary(history, device)  # C: first and last step, and where the time went
    return history


# ================================================================================================
# Engineering A: memory: the in-place log-softmax backward, and LoRA (train adapters, not the weights)
# (engineering after the lesson; read it when you need it)
# ================================================================================================
# With Qwen2.5's 151,936-token vocabulary the logits are the largest tensors of an update (4 sequences x 400 tokens
# x 151,936 x 4 bytes = 0.97 GB), and plain autograd keeps or builds several of that size for the backward pass.
# Written by hand, the backward needs none: it turns the logits into their own gradient, row by row.


class InPlaceSelectiveLogSoftmax(torch.autograd.Function):
    """selective_log_softmax (section 4) with a backward that overwrites the logits with their gradient.

    forward:   log p(x) = logit[x] / T - logsumexp(logits / T), one sequence at a time, in float32
    backward:  d log p(x) / d logits = (onehot(x) - softmax(logits / T)) / T, written into the logits
    So it runs backward once only (a second raises autograd's in-place error), on logits nobody else reads.
    apply(logits (N, T, V), token_ids (N, T), temperature) -> (N, T) float32.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> torch.Tensor:
        token_logits = logits.gather(dim=-1, index=token_ids.unsqueeze(-1)).squeeze(-1).float() / temperature  # (N, T)
        log_normalizers = torch.stack([  # (N, T); at T = 1 no scaled copy of the row is made
            torch.logsumexp(row.float() if temperature == 1.0 else row.float() / temperature, dim=-1)
            for row in logits])
        ctx.save_for_backward(logits, token_ids, log_normalizers)
        ctx.temperature = temperature
        return token_logits - log_normalizers  # (N, T)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        logits, token_ids, log_normalizers = ctx.saved_tensors
        t = ctx.temperature
        for i in range(logits.size(0)):  # one sequence at a time
            g = grad_output[i].unsqueeze(-1).float() / t  # (T, 1)
            row = logits[i].float()  # (T, V): float32 logits are this very memory; bf16 ones get a float32 copy
            if t != 1.0:
                row.div_(t)
            row.sub_(log_normalizers[i].unsqueeze(-1)).exp_()  # (T, V): softmax(logits / T)
            row.mul_(-g).scatter_add_(-1, token_ids[i].unsqueeze(-1), g)  # (T, V): (onehot - softmax) / T * grad
            logits[i] = row  # a no-op for float32 (row is logits[i]); rounds back to bf16 otherwise
        return logits, None, None


# LoRA (Hu et al. 2021, arXiv 2106.09685): each chosen linear layer keeps its weight W frozen and learns a low-rank
# correction. Frozen weights need no gradients, no AdamW moments, and no copy in the reference model, which can share
# them: the 1.5B model holds about 4.4 GB, not 30.9, before any activation.
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # Qwen2's and Llama's attention and MLP


class LoRALinear(nn.Module):
    """A frozen linear layer and a trained low-rank correction, the adapters A and B:
        y = W x + b + (alpha / R) B A x,   W (out, in) frozen, A (R, in) random, B (out, R) zero at the start
    so a new LoRALinear computes exactly what the layer did, and training moves W's effective value by
    (alpha / R) B A, of rank R at most."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, frozen_dtype: torch.dtype | None = None):
        super().__init__()
        self.base = base.requires_grad_(False).to(frozen_dtype or base.weight.dtype)  # W, b
        self.scaling = alpha / rank
        self.A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)  # nn.Linear's random init
        self.B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.zeros_(self.B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.B(self.A(x))


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    """model's LoRALinear layers ([] for a model without adapters: full fine-tuning)."""
    return [module for module in model.modules() if isinstance(module, LoRALinear)]


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str], frozen_dtype: torch.dtype | None = None):
    """Freeze every weight of model and put a LoRALinear around each nn.Linear named in targets (the last part of
    its name), its adapters in float32. frozen_dtype bfloat16 (GPU, --bf16): the frozen W and b under an adapter
    are held in bf16; autocast rounds them so at every matmul anyway, so only the memory changes."""
    model.requires_grad_(False)  # AdamW skips weights without a gradient: no moments, no weight decay
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rpartition(".")[2] in targets]
    missing = sorted(set(targets) - {name.rpartition(".")[2] for name in names})
    if missing:
        raise DataError(f"--lora_targets: the model has no linear layer named {', '.join(missing)}")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, LoRALinear(model.get_submodule(name), rank, alpha, frozen_dtype))


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its weight, W <- W + (alpha / R) B A in float32, and put the plain nn.Linear back:
    the model is then the adapted one for any code (save_pretrained, from_pretrained, generate)."""
    for name in [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]:
        layer = model.get_submodule(name)
        merged = layer.base.float()  # W and b back in float32 if held in bf16
        with torch.no_grad():
            merged.weight += layer.scaling * layer.B.weight @ layer.A.weight
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, merged)


def lora_reference_model(policy: nn.Module) -> nn.Module:
    """The reference model of a policy with adapters: a frozen copy of it that shares every frozen weight with it
    and copies only the adapters (MBs, not GBs). W never trains, so sharing it is exact: the reference is the policy
    as it is now, as make_reference_model's full copy would be. At the start of a run B = 0, and it computes exactly
    the loaded model: the policy with its adapters off. After a cold start it is the cold-started policy, and at each
    --num_iterations start the policy then."""
    frozen = {id(p): p for p in policy.parameters() if not p.requires_grad}  # deepcopy's memo: these are not copied
    return copy.deepcopy(policy, memo=frozen).eval().requires_grad_(False)


def lora_state(model: nn.Module) -> dict:
    """The adapters' weights alone, by name: what a checkpoint of a policy or reference model with LoRA holds."""
    return {name: value for name, value in model.state_dict().items() if name.endswith((".A.weight", ".B.weight"))}


# ================================================================================================
# Engineering B: exact sampling, DataParallel and torchrun (several GPUs, processes and machines)
# (engineering after the lesson; read it when you need it)
# ================================================================================================
# The loop calls three methods of a Parallel object: generate, log_probs and grpo_gradients, each the lesson's
# function with the work spread out. `python grpo.py`: nn.DataParallel, a replica in a thread on each visible GPU
# (without GPUs it calls the module: the tests run this path). `torchrun ... grpo.py`: one process per GPU or CPU
# worker, each on its block of the step's rows. Rollouts are drawn from random numbers fixed before they are split,
# so that no split changes a completion, and by inverse CDF, 4x faster than multinomial over 151,936 logits.


class InverseCDFSampler(LogitsProcessor):
    """Draws each next token from softmax(scores / temperature), inside generate(): sample_sequences' draw,
    from random numbers given up front.

    Inverse-CDF sampling: with w = exp((s - max s) / temperature) and its running sum c (c_V = sum w),
    take u ~ Uniform[0, 1) and the first token k with c_k > u * c_V; then P(k) = w_k / c_V exactly.
    The uniforms are drawn up front, one per sequence and new token (n, max_new_tokens), so a sample
    depends on its own row only: splitting the rows over GPUs or processes changes no completion. It
    returns -inf except at the drawn token, for greedy mode's argmax.
    """

    def __init__(self, temperature: float, uniforms: torch.Tensor, prompt_length: int):
        self.temperature, self.uniforms, self.prompt_length = temperature, uniforms, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = self.uniforms[:, input_ids.size(1) - self.prompt_length].unsqueeze(1)  # (n, 1), this token's draws
        weights = torch.exp((scores - scores.max(dim=-1, keepdim=True).values) / self.temperature)  # (n, V)
        cdf = weights.cumsum(dim=-1)  # (n, V), unnormalised: the last column is the total
        token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=scores.size(-1) - 1)  # (n, 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)  # (n, V)


def sample_exactly(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, uniforms: torch.Tensor | None, *,
                   max_new_tokens: int, temperature: float | None, eos_token_ids: list[int],
                   pad_token_id: int) -> torch.Tensor:
    """sample_sequences (section 6), the tokens drawn by InverseCDFSampler from uniforms (n, max_new_tokens):
    the same distribution, softmax(logits / temperature); None: greedy. -> (n, P + t)"""
    samplers = [] if temperature is None else [InverseCDFSampler(temperature, uniforms, prompt_ids.size(1))]
    # Greedy mode applies none of the checkpoint's sampling filters, and its repetition penalty is switched
    # off (Qwen2.5 sets none of generate's other processors, e.g. suppress_tokens, no_repeat_ngram_size).
    return model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new_tokens,
                          do_sample=False, repetition_penalty=1.0, logits_processor=LogitsProcessorList(samplers),
                          eos_token_id=eos_token_ids, pad_token_id=pad_token_id, use_cache=True)  # (n, P + t)


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """module in nn.DataParallel over every visible GPU when device is CUDA; unchanged under torchrun,
    and with --device cpu on a machine with GPUs (where DataParallel would move the work to them)."""
    spread = not torch.distributed.is_initialized() and (device.type == "cuda" or not torch.cuda.is_available())
    return nn.DataParallel(module) if spread else module


class GenerateModule(nn.Module):
    """sample_exactly as a module DataParallel can split, autocast in each replica's thread: forward(prompt_ids,
    prompt_mask, uniforms) -> (n, P + max_new_tokens), padded to that width so the replicas' outputs concatenate."""

    def __init__(self, model: nn.Module, autocast_dtype: torch.dtype | None = None, **settings):
        super().__init__()
        self.model, self.autocast_dtype, self.settings = model, autocast_dtype, settings

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, uniforms: torch.Tensor | None = None):
        # generate() reads the device from parameters(); a replica has none, its weights are in _former_parameters
        for sub in self.modules():
            if getattr(sub, "_is_replica", False) and not sub._parameters:
                sub._parameters = dict(getattr(sub, "_former_parameters", {}))
        with torch.autocast(prompt_ids.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
            sequences = sample_exactly(self.model, prompt_ids, prompt_mask, uniforms, **self.settings)  # (n, P + t)
        width = prompt_ids.size(1) + self.settings["max_new_tokens"]
        return nn.functional.pad(sequences, (0, width - sequences.size(1)), value=self.settings["pad_token_id"])


class LogProbModule(nn.Module):
    """compute_log_probs as a module DataParallel can split, with the in-place backward (engineering A):
    forward(input_ids, attention_mask, logits_to_keep) -> (n, T)."""

    def __init__(self, model: nn.Module, temperature: float, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.model, self.temperature, self.autocast_dtype = model, temperature, autocast_dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int) -> torch.Tensor:
        with torch.autocast(input_ids.device.type, self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return compute_log_probs(self.model, input_ids, attention_mask, logits_to_keep, self.temperature,
                                     log_softmax=InPlaceSelectiveLogSoftmax.apply)


@dataclass
class Parallel:
    """This process's place in the run (process 0 of 1 without torchrun), its device and autocast, and
    the lesson's heavy functions spread over GPUs and processes, each returning what the lesson's does."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None
    trained: nn.Module | None = None  # under torchrun: the policy in DistributedDataParallel

    @property
    def gpus(self) -> int:
        """How many GPUs DataParallel splits this process's rows over (1 on CPU and under torchrun)."""
        return torch.cuda.device_count() if self.device.type == "cuda" and self.world_size == 1 else 1

    def rows(self, num_rows: int) -> slice:
        """This process's block of num_rows rows: ceil(num_rows / world_size) of them, fewer at the end."""
        size = -(-num_rows // self.world_size)
        return slice(min(self.rank * size, num_rows), min((self.rank + 1) * size, num_rows))

    def gather(self, part: torch.Tensor) -> torch.Tensor:
        """Every process's block of rows (see rows), concatenated in rank order (through the CPU: small)."""
        return part if self.world_size == 1 else torch.cat(self.gather_objects(part.cpu())).to(part.device)

    def gather_objects(self, value) -> list:
        """Every process's value (any picklable object), in rank order: [value] for a single process."""
        values = [value] * self.world_size
        if self.world_size > 1:
            torch.distributed.all_gather_object(values, value)
        return values

    def fail_together(self, function, *args):
        """function(*args) (None: nothing to do on this process); a DataError on any process is raised on every
        one, so that none waits for one that has exited (Session: process 0 prints it)."""
        try:
            result, error = function(*args) if function else None, None
        except DataError as e:
            result, error = None, f"[process {self.rank}] {e}" if self.rank else str(e)
        errors = [message for message in self.gather_objects(error) if message is not None]
        if errors:
            raise DataError(errors[0])
        return result

    def barrier(self) -> None:
        """Wait until every process gets here (e.g. while process 0 writes a checkpoint)."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def generate(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, **settings) -> torch.Tensor:
        """sample_sequences of all N rows (N, P + max_new_tokens), drawn by sample_exactly: this process's block,
        over its GPUs. Every process draws the same uniforms from its seeded CPU generator, whatever the device."""
        uniforms = None if settings["temperature"] is None else torch.rand(  # (N, max_new_tokens)
            len(prompt_ids), settings["max_new_tokens"]).to(prompt_ids.device)
        rows = self.rows(len(prompt_ids))
        if rows.start == rows.stop:  # more processes than rows (a short last evaluation batch)
            part = prompt_ids.new_zeros((0, prompt_ids.size(1) + settings["max_new_tokens"]))
        else:
            generator = data_parallel(GenerateModule(model, self.autocast_dtype, **settings), self.device)
            part = generator(prompt_ids[rows], prompt_mask[rows], None if uniforms is None else uniforms[rows])
        return self.gather(part)  # (N, P + max_new_tokens)

    def log_probs(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int,
                  temperature: float, micro_batch_size: int) -> torch.Tensor:
        """compute_log_probs of all N rows, no gradient, micro_batch_size rows per GPU at a time: (N, T)."""
        scorer = data_parallel(LogProbModule(model, temperature, self.autocast_dtype), self.device)
        rows = self.rows(len(input_ids))
        ids, mask = input_ids[rows], attention_mask[rows]  # (n, P + T)
        with torch.no_grad():
            part = torch.cat([scorer(ids[c], mask[c], logits_to_keep)
                              for c in micro_batches(len(ids), micro_batch_size * self.gpus)])  # (n, T)
        return self.gather(part)  # (N, T)

    def grpo_gradients(self, policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       completion_mask: torch.Tensor, advantages: torch.Tensor, old_log_probs: torch.Tensor | None,
                       ref_log_probs: torch.Tensor | None, micro_batch_size: int, beta: float, epsilon: float,
                       temperature: float, **variant) -> tuple[torch.Tensor, dict]:
        """accumulate_grpo_gradients(partial(compute_log_probs, policy, temperature=temperature), ...) on this
        process's rows, with the in-place backward (engineering A) and DistributedDataParallel under torchrun:
        the log-probs of all N rows (N, T), the loss and metrics as floats averaged over the processes.
        Each process averages its loss over its rows (TOKEN_MEAN_LOSSES: over the step's tokens / world_size)
        and DDP averages the gradients, so the update is the single-process full-batch one."""
        if self.world_size > 1 and self.trained is None:
            self.trained = nn.parallel.DistributedDataParallel(
                policy, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)  # the gradients live in DDP's buckets, not in a second copy
        scorer = data_parallel(LogProbModule(self.trained or policy, temperature, self.autocast_dtype), self.device)
        rows = self.rows(len(input_ids))
        old = None if old_log_probs is None else old_log_probs[rows]  # (n, T)
        ref = None if ref_log_probs is None else ref_log_probs[rows]  # (n, T)
        log_probs, totals = accumulate_grpo_gradients(
            scorer, input_ids[rows], attention_mask[rows], completion_mask[rows], advantages[rows], old, ref,
            micro_batch_size * self.gpus, beta, epsilon, batch_tokens=completion_mask.sum().item() / self.world_size,
            no_sync=self.trained.no_sync if self.trained is not None else None, **variant)
        every = self.gather_objects({name: float(value) for name, value in totals.items()})  # each process's metrics
        return self.gather(log_probs), {name: sum(v[name] for v in every) / self.world_size for name in totals}


# ================================================================================================
# Engineering C: logs, checkpoints, resume, signals and faults
# (engineering after the lesson; read it when you need it)
# ================================================================================================
# A real run takes hours. It must say how it is doing, survive being stopped (Ctrl-C, a pre-empted job), carry on
# exactly where it stopped, and not let one NaN destroy the weights. Checkpoints are output_dir/checkpoint-{step}.
CHECKPOINT_PREFIX = "checkpoint-"


def eta(step_seconds: list[float], steps_left: int) -> str:
    """The time left as h:mm:ss: the median of the last five step times (the first ones warm up) x the steps left."""
    seconds = int(statistics.median(step_seconds[-5:]) * steps_left) if step_seconds else 0
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def step_line(record: dict, total_steps: int, time_left: str) -> str:
    """The one line printed per step (at most 120 characters): what tells whether RL is working."""
    return (f"step {record['step']}/{total_steps} reward {record['reward']:.3f} "
            f"(correct {record['correctness_reward']:.3f} format {record['format_reward']:.3f}) "
            f"std {record['reward_std']:.2f} kl {record['kl']:.4f} clip {record['clip_ratio']:.3f} "
            f"len {record['completion_length']:.0f} {record['step_seconds']:.1f}s eta {time_left}")


def details_line(record: dict) -> str:
    """Every log_completions_steps steps, a second line (at most 120 characters): diagnostics and times (cispo's
    capped share in place of the clip shares, which are 0 for it; the off-policy mask's dropped share when on)."""
    clip = (f"capped {record['cispo_clip_ratio']:.3f}" if "cispo_clip_ratio" in record else
            f"clip low {record['clip_ratio_low']:.3f} high {record['clip_ratio_high']:.3f}")
    dropped = f" drop {record['off_policy_masked']:.2f}" if "off_policy_masked" in record else ""
    return (f"  loss {record['loss']:+.4f} grad {record['grad_norm']:.3f} {clip} zero-std "
            f"{record['frac_reward_zero_std']:.2f} trunc {record['truncated_ratio']:.2f}{dropped} rollout "
            f"{record['rollout_seconds']:.1f}s update {record['update_seconds']:.1f}s")


def print_run_summary(history: list[dict], device: torch.device) -> None:
    """The run at a glance: reward, correctness, format and KL of its first and last steps, and where the time went."""
    if not history:
        return
    first, last = history[0], history[-1]
    print("first -> last step: " + ", ".join(f"{label} {first[key]:.4f} -> {last[key]:.4f}" for key, label in (
        ("reward", "reward"), ("correctness_reward", "correct"), ("format_reward", "format"), ("kl", "kl"))))
    mean = {key: sum(record[key] for record in history) / len(history) for key in history[0] if key != "eval"}
    peak_mib = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"  # on CPU: max RSS, Linux's KiB
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    print(f"summary: {len(history)} step{'s' if len(history) > 1 else ''}, {mean['step_seconds']:.2f} s/step = rollout "
          f"{mean['rollout_seconds']:.2f} s + update {mean['update_seconds']:.2f} s + reference pass and scoring\n"
          f"         generation {mean['generation_tokens_per_second']:.0f} tok/s, training "
          f"{mean['train_tokens_per_second']:.0f} tok/s; peak memory {peak_mib:.0f} MiB "
          f"({'CUDA max allocated' if device.type == 'cuda' else 'max RSS'})", flush=True)


def list_checkpoints(output_dir: str) -> list[str]:
    """The complete checkpoints in output_dir, oldest first (a '.tmp' folder is a save that never finished)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = [int(n[len(CHECKPOINT_PREFIX):]) for n in names if re.fullmatch(CHECKPOINT_PREFIX + r"\d+", n)]
    return [os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}") for step in sorted(steps)]


def save_checkpoint(output_dir: str, step: int, policy, tokenizer, optimizer, reference, extra: dict,
                    save_total_limit: int) -> str:
    """Write checkpoint-{step}: weights and tokenizer (save_pretrained; LoRA: the adapters, adapters.pt), optimizer
    state, the reference model (LoRA: its adapters), step, RNG states and `extra`, into a '.tmp' folder renamed into
    place (a crash mid-save never leaves a checkpoint that looks whole). Keeps the newest save_total_limit of them."""
    final = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    partial = final + ".tmp"
    shutil.rmtree(partial, ignore_errors=True)
    tokenizer.save_pretrained(partial)
    if lora_layers(policy):
        torch.save(lora_state(policy), os.path.join(partial, "adapters.pt"))
    else:
        policy.save_pretrained(partial)
    rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "rng": rng, **extra},
               os.path.join(partial, "training_state.pt"))
    if reference is not None:  # LoRA: its adapters (its other weights are the policy's)
        torch.save(lora_state(reference) if lora_layers(reference) else reference.state_dict(),
                   os.path.join(partial, "reference_model.pt"))
    shutil.rmtree(final, ignore_errors=True)  # an older save of the same step
    os.replace(partial, final)
    for old in list_checkpoints(output_dir)[:-save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_training_state(checkpoint_dir: str, device: torch.device | str = "cpu") -> dict:
    """The counters, optimizer state, RNG states (and the reference weights or LoRA adapters, if saved) of a checkpoint,
    its tensors loaded onto `device` whatever device saved them (a GPU checkpoint resumes on a CPU)."""
    def load(name):  # weights_only: tensors and plain containers, never pickled code
        path = os.path.join(checkpoint_dir, name)
        return torch.load(path, map_location=device, weights_only=True) if os.path.exists(path) else None

    return {**load("training_state.pt"), "reference": load("reference_model.pt"), "adapters": load("adapters.pt"),
            "path": checkpoint_dir}


def restore_rng(rng: dict) -> None:
    """Put back save_checkpoint's python, torch and CUDA random states (of the GPUs here: it may have had more)."""
    random.setstate(rng["python"])
    torch.set_rng_state(rng["torch"].cpu())
    for index, state in enumerate(rng["cuda"][:torch.cuda.device_count()] if torch.cuda.is_available() else []):
        torch.cuda.set_rng_state(state.cpu(), index)


def write_file(path: str, text: str) -> None:
    """Write text to a '.tmp' file, then rename it into place: an interruption never leaves half a file."""
    pathlib.Path(path + ".tmp").write_text(text, encoding="utf-8")
    os.replace(path + ".tmp", path)


def keep_metrics_up_to(metrics_path: str, step: int) -> None:
    """On resume, drop the metrics of steps after the checkpoint (they run again) and a line cut short by a kill."""
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path, encoding="utf-8") as f:  # a line cut short by a kill is the last, without its newline
        kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
    write_file(metrics_path, "".join(kept))


class Stopped(Exception):
    """The run ends early: by a signal (signum), or after repeated non-finite updates (signum None)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum


class StopRequest:
    """The handler of SIGINT (Ctrl-C) and SIGTERM (a pre-empted job). While training (RunControl.start until the
    final model is saved) a first signal is only recorded: the step, or the checkpoint or final model being
    written, is finished, then the run stops (after a checkpoint); a second quits at once without saving
    (KeyboardInterrupt). Anywhere else (loading, evaluation) the first stops the run at once."""

    def __init__(self, repeat_quits: bool = True):
        # Under torchrun a repeated signal is torchrun forwarding, not "quit now": it kills workers alive after 30 s
        self.signum, self.training, self.repeat_quits, self.saving = None, False, repeat_quits, None
        self.where = "while loading"  # what the run is doing, for the message (Session keeps it up to date)

    def received_anywhere(self, parallel: Parallel) -> int | None:
        """The signal to stop for, if any process got one: under torchrun they may arrive at different moments."""
        return max(parallel.gather_objects(self.signum or 0)) or None

    def __call__(self, signum: int, frame) -> None:
        if self.signum is not None:
            if self.training and self.repeat_quits:
                raise KeyboardInterrupt
            return  # the run is already on its way out
        self.signum = signum
        if not self.training:
            raise Stopped(f"stopped by {signal.Signals(signum).name} {self.where}", signum)
        again = "send it again to quit at once, without saving" if self.repeat_quits else "torchrun ends it"
        doing = (f"stopping once {self.saving} is written" if self.saving
                 else "finishing this step, then saving a checkpoint")
        message = f"\n{signal.Signals(signum).name}: {doing} ({again})\n"
        try:  # straight to the file: the signal may have interrupted a print, which print cannot re-enter
            os.write(sys.stdout.fileno(), message.encode())
        except (AttributeError, OSError, ValueError):  # a stream without a file (a test's capture)
            print(message, end="", flush=True)


@dataclass
class RunControl:
    """Everything about a run that is not GRPO: what it prints and writes, when it saves checkpoints, what
    it carries on from, when it stops. train_with_grpo calls start once and end_step after each step."""

    output_dir: str | None = None  # checkpoints and metrics.jsonl (one JSON line per step) go here (None: none)
    save_steps: int = 0  # a checkpoint every this many steps (0: only at the end or when stopping early)
    save_total_limit: int = 2
    max_bad_steps: int = 3  # stop after this many steps in a row with a skipped non-finite update
    log_completions_steps: int = 0
    resume: dict | None = None  # load_training_state() of the checkpoint to carry on from (let go of once used)
    stop: StopRequest = field(default_factory=StopRequest)
    parallel: Parallel = field(default_factory=Parallel)  # under torchrun: all processes stop and save together
    bad_steps: int = 0  # steps in a row with a skipped update
    step_seconds: list = field(default_factory=list)  # of the steps this process ran, for the ETA
    total_steps: int = 0
    mu: int = 1
    evaluation: dict = field(default_factory=dict)  # eval.json's content, shared with Session
    flat_steps: int = 0  # steps in a row in which every group's rewards were equal (no advantage anywhere)

    def start(self, optimizer, policy: nn.Module, amp_dtype: torch.dtype | None, beta: float, total_steps: int,
              mu: int = 1):
        """(step, reference model) to start from: (0, None) for a new run, else the checkpoint's, its state restored."""
        self.total_steps, self.mu, self.stop.training = total_steps, mu, True  # a signal now lets the step finish
        state, self.resume = self.resume, None  # dropped once used: the optimizer state is large
        if state is None:
            return 0, None
        settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
        optimizer.load_state_dict(state.pop("optimizer"))
        for group, setting in zip(optimizer.param_groups, settings):  # this run's flags and kernel, not the saved
            group.update(setting)
        restore_rng(state["rng"])
        self.bad_steps = state["bad_steps"]
        if self.output_dir and self.parallel.rank == 0:
            keep_metrics_up_to(os.path.join(self.output_dir, "metrics.jsonl"), state["step"])
        if state.get("adapters"):  # LoRA: the adapters, all that trained (the frozen weights are --model_name's)
            policy.load_state_dict(state.pop("adapters"), strict=False)
        reference = None
        if beta != 0.0 and state["step"] < total_steps:  # the iteration's reference (replaced when one starts)
            reference = self.reference_model(policy, amp_dtype)  # none saved (--beta 0 then): the resumed policy
            if state["reference"] is not None:  # LoRA: its adapters alone
                reference.load_state_dict(state.pop("reference"), strict=not lora_layers(policy))
        finished = ": this run is finished; a larger --num_steps (counted from its start) trains it further"
        print(f"resumed from {state['path']} at step {state['step']}/{total_steps}"
              f"{finished if state['step'] >= total_steps else ''}")
        return state["step"], reference

    def reference_model(self, policy: nn.Module, amp_dtype: torch.dtype | None) -> nn.Module:
        """make_reference_model(policy, amp_dtype), or for a policy with LoRA adapters (engineering A) one that
        shares its frozen weights: lora_reference_model(policy)."""
        return lora_reference_model(policy) if lora_layers(policy) else make_reference_model(policy, amp_dtype)

    def end_step(self, record: dict, sample: tuple, policy, tokenizer, optimizer, reference) -> None:
        """Print the step's line (every log_completions_steps steps also details and a sample), append it to
        metrics.jsonl, save a checkpoint if due or the run must stop (a signal, max_bad_steps bad steps), then stop."""
        step, skipped = record["step"], record["skipped_updates"]
        self.step_seconds.append(record["step_seconds"])
        if self.output_dir and self.parallel.rank == 0:  # json has no NaN: a skipped loss is null
            with open(os.path.join(self.output_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                    for k, v in record.items()}) + "\n")
            if "eval" in record:
                self.evaluation[f"step_{step}"] = record["eval"]
                write_file(os.path.join(self.output_dir, "eval.json"), json.dumps(self.evaluation, indent=2))
        print(step_line(record, self.total_steps, eta(self.step_seconds, self.total_steps - step)), flush=True)
        if skipped:
            print(f"  SKIPPED {skipped}/{self.mu} non-finite updates of step {step} (the loss or gradient norm "
                  "was NaN/inf)", flush=True)
        self.flat_steps = self.flat_steps + 1 if record["frac_reward_zero_std"] == 1.0 else 0
        if self.flat_steps == 3:  # said once per such stretch, at its third step
            print(f"  NO LEARNING SIGNAL: for 3 steps every group's rewards were equal (reward {record['reward']:.2f}, "
                  f"truncated {record['truncated_ratio']:.0%}), so every advantage is 0 and GRPO learns nothing; if no "
                  "completion earns a reward, a cold start (--sft_steps 16); else more completions per prompt "
                  "(--num_generations), other questions, a longer --max_completion_length if cut, a larger model",
                  flush=True)
        if self.log_completions_steps and step % self.log_completions_steps == 0:
            question, text, answer, reward = sample
            print(f"{details_line(record)}\n--- sample (reward {reward:.1f}, answer {answer}) ---\n{question}\n"
                  f">>> {text}\n---", flush=True)
        self.bad_steps = self.bad_steps + 1 if skipped else 0
        signum = self.stop.received_anywhere(self.parallel)
        saved = "nothing new to save"
        if self.output_dir and (signum or self.bad_steps >= self.max_bad_steps or step == self.total_steps
                                or (self.save_steps and step % self.save_steps == 0)):
            self.stop.saving = os.path.join(self.output_dir, f"{CHECKPOINT_PREFIX}{step}")
            if self.parallel.rank == 0:  # one writer; the others wait for it
                save_checkpoint(self.output_dir, step, policy, tokenizer, optimizer, reference,
                                {"bad_steps": self.bad_steps}, self.save_total_limit)
            self.parallel.barrier()
            saved, self.stop.saving = f"checkpoint saved in {self.stop.saving}", None
            signum = self.stop.received_anywhere(self.parallel)  # one may have come meanwhile
        if self.bad_steps >= self.max_bad_steps:
            raise Stopped(f"{self.bad_steps} steps in a row had a non-finite loss or gradient norm (the last "
                          f"good weights are kept); lower --learning_rate or check the data; {saved}")
        if signum is not None:
            raise Stopped(f"stopped by {signal.Signals(signum).name} after step {step}; {saved}", signum)


# ================================================================================================
# Engineering D: loading, the output folder, one-line errors, and main's bookkeeping
# (engineering after the lesson; read it when you need it)
# ================================================================================================
# Each expected failure ends in one line saying what is wrong and what to do, and leaves nothing behind.


class DataError(ValueError):
    """A data set, model or folder that cannot be used; main() prints its message as one line and exits 1."""


def offline_advice(local: str) -> str:
    """What to do without a network: the local file or folder to pass (local), and the hub cache unless in use."""
    cache = "" if os.environ.get("HF_HUB_OFFLINE") == "1" else ", or set HF_HUB_OFFLINE=1 to use the hub cache"
    return f"without a network, pass a local {local}{cache}"


def looks_local(name: str) -> bool:
    """Whether name means a local path rather than a hub id ("owner/name")."""
    return (name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith((".json", ".jsonl"))
            or os.path.isdir(name.split("/")[0]))


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else type(error).__name__


def _gsm8k_rows(source: str, split: str, flag: str) -> list[dict]:
    """Raw rows from a local .json/.jsonl file (a JSON list or one object per line) or a hub data set."""
    if not looks_local(source):
        import datasets  # imported here: local files and the tests do not pay for it (about 90 MB)
        try:
            return list(datasets.load_dataset(source, "main", split=split))
        except Exception as e:  # the hub raises many kinds (offline, unknown name, no such split)
            raise DataError(f"could not load data set '{source}' (split '{split}'): {first_line(e)}; "
                            f"{offline_advice(flag + ' FILE.jsonl')}") from None
    json_name = source.endswith((".json", ".jsonl"))
    if os.path.isdir(source) or (os.path.exists(source) and not json_name):
        raise DataError(f"{source}: a local data set must be a .json or .jsonl file")
    if not os.path.isfile(source):
        hint = "" if "/" in source or json_name else " (a hub data set is named owner/name, e.g. openai/gsm8k)"
        raise DataError(f"data file not found: {source}{hint}")
    try:
        text = pathlib.Path(source).read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the JSON
        if text.lstrip().startswith("["):
            return json.loads(text)
        rows = []
        for line in re.finditer(r"^.*\S.*$", text, re.MULTILINE):  # each line that is not blank, and where it starts
            try:
                rows.append(json.loads(line[0]))
            except json.JSONDecodeError as e:  # report the file's line and column, not the line's own
                raise json.JSONDecodeError(e.msg, text, line.start() + e.pos) from None
        return rows
    except UnicodeDecodeError:
        raise DataError(f"{source} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{source} is not valid JSON or JSON Lines ({e})") from None


def load_gsm8k(source: str, split: str = "train", flag: str = "--dataset") -> list[dict]:
    """GSM8K-style examples [{"question", "answer": the part after '####', "solution": the part before}] from a hub
    data set (config "main") or a local .json/.jsonl file; rows without a question or an answer are skipped."""
    rows = _gsm8k_rows(source, split, flag)  # flag: the one that named source, for the advice
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"{source}: expected a list of objects with 'question' and 'answer' fields")
    if not rows:
        raise DataError(f"{source} holds no examples")
    missing = sorted({"question", "answer"} - set(rows[0]))
    if missing:
        raise DataError(f"{source}: rows need 'question' and 'answer' fields; missing {missing}")
    examples = [{"question": str(row["question"]), "answer": extract_answer_from_dataset(str(row.get("answer", ""))),
                 "solution": str(row.get("answer", "")).split("####")[0].strip()}  # worked, for a cold start
                for row in rows if str(row.get("question", "")).strip()]
    examples = [ex for ex in examples if ex["answer"] is not None]
    if not examples:
        raise DataError(f"{source}: none of the {len(rows)} rows has a question and an answer with '####'")
    if len(examples) < len(rows):
        print(f"{source}: skipped {len(rows) - len(examples)} of {len(rows)} rows without a question or a "
              "'####' answer")
    return examples


def load_model_and_tokenizer(name: str, device: torch.device):
    """The policy in float32 (master weights; bf16 autocast on GPU) and its tokenizer (chat template, pad token)."""
    path = os.path.expanduser(name)
    if looks_local(name):
        if os.path.isfile(path):
            raise DataError(f"--model_name {name} is a file: pass the folder that save_pretrained wrote")
        if not os.path.isdir(path):
            raise DataError(f"model directory not found: {name}")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise DataError(f"--model_name {name} holds no saved model (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise DataError(f"could not load model '{name}': {first_line(e)}"
                        f"{'' if looks_local(name) else '; ' + offline_advice('--model_name DIR')}") from None
    if not tokenizer.chat_template:
        raise DataError(f"the tokenizer of '{name}' has no chat template; use an instruct/chat model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Left-padded prompts make attention rows that attend to nothing. On H100/H200 with torch >= 2.9 SDPA
    # prefers cuDNN's kernel when a mask is given, which has returned NaN for such rows (unsloth PR #9848)
    # and NaN gradients at lengths 64 mod 128 (pytorch #196678, TRL #7181); flash, memory-efficient and
    # math give 0. The switch is process-wide: DataParallel's threads and the backward pass see it too.
    torch.backends.cuda.enable_cudnn_sdp(False)
    return model.to(device), tokenizer


# On resume these flags must be those the run began with (args.json): they define what is trained. The others
# (learning rate, weight decay, gradient clipping, num_steps, evaluation, saving, logging, memory) take effect.
FIXED_ON_RESUME = ("model_name", "dataset", "seed", "num_iterations", "batch_size", "num_generations", "mu",
                   "max_completion_length", "temperature", "beta", "epsilon", "epsilon_high", "loss_type",
                   "scale_rewards", "importance_sampling_level", "mask_truncated_completions", "delta",
                   "sapo_temperature_pos", "sapo_temperature_neg", "use_bias_correction_kl",
                   "off_policy_mask_threshold", "sft_steps", "sft_batch_size", "sft_learning_rate", "lora_rank",
                   "lora_alpha", "lora_targets")


def prepare_output_dir(args: argparse.Namespace, resume: dict | None) -> None:
    """Create --output_dir once everything has loaded (a failed start leaves nothing behind); a new run deletes an
    earlier attempt's checkpoints, metrics, evaluation and finished model (config.json). args.json: the flags of
    the run's latest start."""
    flags = {k: v for k, v in vars(args).items() if k not in ("resume_from", "overwrite_output_dir")}
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        for old in list_checkpoints(args.output_dir) if resume is None else []:
            shutil.rmtree(old)
        for name in ("metrics.jsonl", "eval.json", "config.json") if resume is None else ():
            pathlib.Path(args.output_dir, name).unlink(missing_ok=True)
        write_file(os.path.join(args.output_dir, "args.json"), json.dumps(flags, indent=2))
    except OSError as e:
        raise DataError(f"cannot write to --output_dir {args.output_dir}: {e.strerror}") from None


class Session:
    """main()'s bookkeeping (see main). An early end prints one line naming the command that carries on (under torchrun
    process 0 alone prints) and exits 1 (bad input, a non-finite run) or 128 + signal (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.evaluation, self.trained, self.resumed, self.evaluating = args, {}, False, False, False
        self.under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ  # torchrun sets it, also for one process
        self.quiet = int(os.environ.get("RANK", "0")) != 0
        self.stop, self.parallel = StopRequest(repeat_quits=not self.under_torchrun), Parallel()

    def __enter__(self) -> "Session":
        self.previous = {signum: signal.signal(signum, self.stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _load(self) -> tuple:
        """The data, the model (a resumed run: the checkpoint --resume_from names) and the resume state; an
        --output_dir holding a run is never reused silently."""
        args, out = self.args, self.args.output_dir
        train_examples, eval_examples = load_gsm8k(args.dataset, "train"), []
        if args.eval_size:
            if args.eval_dataset is None and looks_local(args.dataset):
                raise DataError("evaluation needs held-out data: pass --eval_dataset FILE, or --eval_size 0")
            eval_flag = "--eval_dataset" if args.eval_dataset else "--dataset"
            eval_examples = load_gsm8k(args.eval_dataset or args.dataset, "test", eval_flag)[:args.eval_size]
        if os.path.exists(out) and not os.path.isdir(out):
            raise DataError(f"--output_dir {out} is a file, not a folder")
        checkpoints = list_checkpoints(out)
        if args.resume_from == "latest" and not checkpoints:
            raise DataError(f"--resume_from latest: no checkpoint in {out}")
        checkpoint = checkpoints[-1] if args.resume_from == "latest" else args.resume_from
        if checkpoint and not os.path.isfile(os.path.join(checkpoint, "training_state.pt")):
            raise DataError(f"--resume_from {checkpoint}: not a checkpoint folder (no training_state.pt)")
        if checkpoint and os.path.isfile(os.path.join(out, "args.json")):  # the flags of the run's last start
            began = json.loads(pathlib.Path(out, "args.json").read_text(encoding="utf-8"))
            fixed = FIXED_ON_RESUME + (("num_steps",) if began.get("num_iterations", 1) > 1 else ())  # iterations' ends
            changed = {k: f"--{k} {began[k]} -> {getattr(args, k)}" for k in began  # what args.json records
                       if k in vars(args) and began[k] != getattr(args, k)}
            refused = [changed[k] for k in fixed if k in changed]
            if refused:
                raise DataError(f"a resumed run cannot change what it trains ({', '.join(refused)}); to train with "
                                "them, start a new run in another --output_dir or with --overwrite_output_dir")
            if changed:  # the flags that may change, taking effect now
                print(f"changed since the last start: {', '.join(changed.values())}")
        held = [os.path.basename(path) for path in checkpoints]
        held += ["a finished model"] if os.path.isfile(os.path.join(out, "config.json")) else []  # save_pretrained's
        if not checkpoint and held and not args.overwrite_output_dir:
            raise DataError(f"{out} already holds a run ({', '.join(held[:4])}); continue it with --resume_from latest "
                            "or start again with --overwrite_output_dir")
        policy, tokenizer = load_model_and_tokenizer(  # a LoRA checkpoint holds the adapters, not the weights
            args.model_name if args.lora_rank else checkpoint or args.model_name, self.parallel.device)
        if args.lora_rank:  # engineering A: the loaded weights frozen, low-rank adapters trained
            add_lora(policy, args.lora_rank, args.lora_alpha, args.lora_targets.split(","),
                     torch.bfloat16 if args.bf16 else None)
        resume = load_training_state(checkpoint, self.parallel.device) if checkpoint else None
        return policy, tokenizer, train_examples, eval_examples, resume

    def load(self) -> tuple:
        """Seed, join torchrun's processes, load, prepare --output_dir: (policy, tokenizer, train and eval examples)."""
        args = self.args
        random.seed(args.seed)
        torch.manual_seed(args.seed)  # also seeds every CUDA device
        if args.device == "cuda" and not torch.cuda.is_available():
            raise DataError("--device cuda was asked for, but torch sees no GPU (the default 1.5B run needs one with "
                            "about 40 GB or more; the README has CPU commands)")
        # cuda (or auto with a GPU): GPU 0, DataParallel over every visible GPU (torchrun: one per process)
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        args.bf16 = args.bf16 and device.type == "cuda"  # args.json records what applies
        world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), 0
        if world_size > 1:  # join torchrun's processes (WORLD_SIZE, RANK, LOCAL_RANK): NCCL, a GPU each, or gloo
            if device.type == "cuda":
                device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
                torch.cuda.set_device(device)
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            rank = torch.distributed.get_rank()
        self.parallel = parallel = Parallel(rank, world_size, device, torch.bfloat16 if args.bf16 else None)
        if parallel.rank != 0:
            sys.stdout = open(os.devnull, "w")  # under torchrun, process 0 alone prints
        if not torch.cuda.is_available() and args.model_name == build_parser().get_default("model_name"):
            print("no GPU: the default run (the 1.5B model, 500 steps) needs one with about 40 GB or more; on a CPU "
                  "use a small model and few steps (README: Running it)")
        transformers.utils.logging.disable_progress_bar()  # its loading/saving bars would cut into the log
        policy, tokenizer, train_examples, eval_examples, resume = parallel.fail_together(self._load)
        parallel.fail_together(prepare_output_dir if parallel.rank == 0 else None, args, resume)
        if args.gradient_checkpointing:  # transformers applies it in train mode only: rollouts keep their speed
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        print(f"{len(train_examples)} training examples, {len(eval_examples)} evaluation examples, model "
              f"{args.model_name} ({sum(p.numel() for p in policy.parameters()):,} parameters, {trained:,} trained"
              f"{f' in LoRA adapters of rank {args.lora_rank}' if args.lora_rank else ''}) on {parallel.device}"
              f"{f' x {parallel.world_size} processes' if parallel.world_size > 1 else ''}"
              f"{f' (DataParallel over {parallel.gpus} GPUs)' if parallel.gpus > 1 else ''}")
        eval_path = pathlib.Path(args.output_dir, "eval.json")
        if resume and eval_path.exists():  # the evaluations of the stages before this start are kept
            self.evaluation = json.loads(eval_path.read_text(encoding="utf-8"))
        self.stop.where, self.resumed = f"before step {resume['step'] + 1 if resume else 1}", resume is not None
        flags = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(RunControl)}}  # save_steps, ...
        self.run = RunControl(**flags, resume=resume, stop=self.stop, parallel=parallel, evaluation=self.evaluation)
        return policy, tokenizer, train_examples, eval_examples

    def evaluate(self, when: str, policy, tokenizer, examples: list[dict]) -> None:
        """The evaluation "before" training, "after_cold_start" or "after" (every process takes part), written to
        eval.json. The first two are kept from a resumed run's first start; "after" runs when this run trained or
        has none yet. After the last, one line compares the stages."""
        if not examples or (not self.trained and "after" in self.evaluation if when == "after" else self.resumed):
            return
        self.evaluating = True  # its progress line is open until it ends
        self.evaluation[when] = evaluate_model(
            policy, tokenizer, examples, max_new_tokens=self.args.max_completion_length,
            batch_size=self.args.eval_batch_size, label=f"eval {when.replace('_', ' ')}",
            generate=self.parallel.generate)
        self.evaluating = False
        if self.parallel.rank == 0:
            write_file(os.path.join(self.args.output_dir, "eval.json"), json.dumps(self.evaluation, indent=2))
        stages = {s: self.evaluation[s] for s in ("before", "after_cold_start", "after") if s in self.evaluation}
        if when == "after" and len(stages) > 1:  # e.g. "before 0.0% / 32.5% -> after 70.0% / 72.5%"
            same_size = len({result["num_examples"] for result in stages.values()}) == 1
            print("accuracy, strict / lenient: " + " -> ".join(
                f"{s.replace('_', ' ')} {r['strict_accuracy']:.1%} / {r['lenient_accuracy']:.1%}"
                + ("" if same_size else f" (of {r['num_examples']} questions)") for s, r in stages.items()))

    def save(self, policy, tokenizer, history: list[dict]) -> None:
        """Save the final model (a signal still waits for it), then stop if a signal came meanwhile."""
        out, self.stop.saving = self.args.output_dir, f"the final model in {self.args.output_dir}"
        merge_lora(policy)  # LoRA: W + (alpha / R) B A, a plain model that loads anywhere (every process)
        if self.parallel.rank == 0 and (history or not os.path.isfile(os.path.join(out, "config.json"))):
            policy.save_pretrained(out)
            tokenizer.save_pretrained(out)
            print(f"saved the trained model and tokenizer to {out}")
        self.parallel.barrier()
        self.trained, self.stop.training, self.stop.saving = bool(history), False, None
        signum = self.stop.received_anywhere(self.parallel)
        if signum is not None:  # a signal while the final model was being saved
            raise Stopped(f"stopped by {signal.Signals(signum).name} once the final model was saved in {out}, "
                          "before the evaluation after training", signum)
        self.stop.where = "during the evaluation after training (the trained model is saved)"

    def __exit__(self, kind, error, traceback) -> bool:
        """Put the signal handlers back; turn an early end into its line and exit code (see the class)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        if error is None:
            self.parallel.barrier()  # no process tears down the process group while another still uses it
            return False
        checkpoints, signum = list_checkpoints(self.args.output_dir), self.stop.signum
        carry_on = "no checkpoint was saved: run the same command again to start over"  # or the command that carries on
        if checkpoints:
            without = " without --overwrite_output_dir and" if self.args.overwrite_output_dir else ""
            carry_on = (f"to carry on from {os.path.basename(checkpoints[-1])}, run the same command{without} with "
                        "--resume_from latest")
        if isinstance(error, DataError):
            raise SystemExit(1 if self.quiet else f"error: {first_line(error)}")
        if isinstance(error, Stopped) and error.signum is None:  # repeated non-finite updates
            raise SystemExit(1 if self.quiet else f"error: {error}; {carry_on} once the cause is fixed")
        if isinstance(error, Stopped):
            code, message = 128 + error.signum, f"{error}; {carry_on}"
        elif isinstance(error, KeyboardInterrupt):  # a second Ctrl-C during training: the user wants out now
            code, message = 128 + signal.SIGINT, f"interrupted; quit without saving; {carry_on}"
        elif isinstance(error, RuntimeError) and self.under_torchrun and signum:  # a peer has already stopped
            code, message = 128 + signum, f"stopped by {signal.Signals(signum).name}; {carry_on}"
        else:
            return False
        if not self.quiet:
            print("\n" if self.evaluating else "", end="", flush=True)  # the message on its own line
            print(message, file=sys.stderr)
        raise SystemExit(code)


def exit_process(code: int | str | None) -> None:
    """End the process as sys.exit(code) would; under torchrun without Python's teardown once the outputs are flushed:
    DDP's autograd hooks keep the process group's threads alive, and gloo may abort when they are destroyed at exit."""
    if not torch.distributed.is_initialized():
        sys.exit(code)
    if isinstance(code, str):  # sys.exit(message): the message, status 1
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    torch.distributed.destroy_process_group()
    os._exit(1 if isinstance(code, str) else code or 0)


# ================================================================================================
# 10. The command line
# ================================================================================================

def _number_type(kind, check, requirement: str):
    """An argparse type: kind(text), refused with exit 2 and a one-line message unless check(value)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {kind.__name__}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return parse


positive_int = _number_type(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number_type(int, lambda v: v >= 0, "0 or more")
at_least_two = _number_type(int, lambda v: v >= 2, "at least 2 (the advantage needs a group std)")
positive_float = _number_type(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
non_negative_float = _number_type(float, lambda v: v >= 0 and math.isfinite(v), "0 or more")
open_unit_float = _number_type(float, lambda v: 0 < v < 1, "strictly between 0 and 1")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after each flag's help; the examples printed as written."""


def build_parser() -> argparse.ArgumentParser:
    """Every hyperparameter as a flag, grouped; defaults follow the seed notebook's run."""
    examples = """examples:
    python grpo.py --num_generations 4 --mu 3                       # the real run (GPU: all visible GPUs)
    CUDA_VISIBLE_DEVICES=0 python grpo.py                           # one GPU
    python grpo.py --lora_rank 16 --learning_rate 5e-5              # a 16-24 GB GPU: LoRA adapters
    torchrun --nproc_per_node 8 grpo.py --batch_size 8              # 8 GPUs, one process each (DDP)
    python grpo.py --model_name Qwen/Qwen2.5-0.5B-Instruct --device cpu --num_steps 2 --batch_size 1 \\
        --max_completion_length 32 --eval_size 4                    # CPU smoke run
"""
    parser = argparse.ArgumentParser(description="GRPO fine-tuning of a chat model on GSM8K (see the module "
                                     "docstring).", formatter_class=_HelpFormatter, epilog=examples)
    g = parser.add_argument_group("model and data")
    g.add_argument("--model_name", default="Qwen/Qwen2.5-1.5B-Instruct", help="hub id or local folder of a chat model")
    g.add_argument("--dataset", default="openai/gsm8k", help="hub data set (config 'main', split 'train') or a "
                   "local .json/.jsonl file with GSM8K's 'question' and 'answer' ('... #### 72') fields")
    g.add_argument("--eval_dataset", default=None, help="held-out data, same forms; default: the 'test' split of "
                   "a hub --dataset (a local --dataset needs this flag for evaluation)")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto = every visible GPU if "
                   "there is one (torchrun: one per process), else CPU; pick GPUs with CUDA_VISIBLE_DEVICES")
    g.add_argument("--seed", type=int, default=42, help="seeds python and torch (sampling, data order)")

    g = parser.add_argument_group("GRPO schedule")
    g.add_argument("--num_iterations", type=positive_int, default=1,
                   help="outer iterations; each starts by copying the current policy into the reference model")
    g.add_argument("--num_steps", type=positive_int, default=500, help="training steps per iteration")
    g.add_argument("--batch_size", type=positive_int, default=7, help="prompts per step (B)")
    g.add_argument("--num_generations", type=at_least_two, default=4, help="completions sampled per prompt (G)")
    g.add_argument("--mu", type=positive_int, default=3, help="policy updates (optimizer steps) per batch of rollouts")

    g = parser.add_argument_group("rollouts")
    g.add_argument("--max_completion_length", type=positive_int, default=400, help="max new tokens per completion")
    g.add_argument("--temperature", type=positive_float, default=1.0,
                   help="sampling temperature; the log-probs are computed at the same temperature")

    g = parser.add_argument_group("loss and optimisation")
    g.add_argument("--beta", type=non_negative_float, default=0.04, help="KL penalty weight; 0 = no reference model")
    g.add_argument("--epsilon", type=open_unit_float, default=0.2, help="PPO clip range: ratio kept in [1-eps, 1+eps]")
    g.add_argument("--learning_rate", type=positive_float, default=5e-6, help="AdamW learning rate (constant)")
    g.add_argument("--weight_decay", type=non_negative_float, default=0.01, help="AdamW weight decay")
    g.add_argument("--max_grad_norm", type=positive_float, default=0.1, help="clip the gradients' global L2 norm")
    g.add_argument("--micro_batch_size", type=positive_int, default=4,
                   help="sequences per forward/backward pass on each GPU; lower it if memory runs out (same result)")
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="recompute activations in the backward pass of the policy update (never during generation)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="on GPU: bf16 autocast with float32 master weights, reference model in bf16; ignored on CPU")

    g = parser.add_argument_group("GRPO variants, with TRL's names (the defaults are DeepSeekMath's GRPO)")
    g.add_argument("--loss_type", default="grpo", choices=["grpo", "dapo", "dr_grpo", "cispo", "sapo"], help="grpo = "
                   "mean of the completions' token means; dapo = mean over all tokens; dr_grpo = sum / (N * max "
                   "length); cispo = capped, detached ratio x log pi (as dapo); sapo = a sigmoid gate (as grpo)")
    g.add_argument("--scale_rewards", default="group", choices=["group", "batch", "none"], help="advantage = (r - "
                   "group mean) / (group std + 1e-4), / (std of the step's rewards + 1e-4), or none (Dr. GRPO)")
    g.add_argument("--epsilon_high", type=positive_float, default=None, help="DAPO's clip-higher: ratio kept in "
                   "[1-epsilon, 1+epsilon_high] (DAPO: 0.28); cispo: the weight's cap is 1+epsilon_high, the paper's "
                   "(TRL's cap is epsilon_high itself: its 5.0 is 4.0 here); None: --epsilon")
    g.add_argument("--importance_sampling_level", default="token", choices=["token", "sequence"],
                   help="sequence = GSPO's exp(mean log-ratio of a completion) for all its tokens (with --epsilon "
                        "3e-4 --epsilon_high 4e-4)")
    g.add_argument("--mask_truncated_completions", action=argparse.BooleanOptionalAction, default=False,
                   help="DAPO's overlong filtering: no loss for a completion cut at --max_completion_length")
    g.add_argument("--delta", type=positive_float, default=None, help="INTELLECT-2's two-sided clipping (grpo, dapo, "
                   "dr_grpo): the unclipped ratio capped at delta, above 1+epsilon_high (INTELLECT-2: 4); None: off")
    g.add_argument("--sapo_temperature_pos", type=positive_float, default=1.0, help="sapo's tau for A > 0 in the gate "
                   "sigmoid(tau (ratio - 1)) * 4 / tau: larger = the gradient fades sooner as the ratio leaves 1")
    g.add_argument("--sapo_temperature_neg", type=positive_float, default=1.05, help="sapo's tau for A <= 0")
    g.add_argument("--use_bias_correction_kl", action=argparse.BooleanOptionalAction, default=False, help="DeepSeek-"
                   "V3.2's unbiased KL: k3 times the ratio (needs --beta > 0); TRL's default is on, the seed's off")
    g.add_argument("--off_policy_mask_threshold", type=positive_float, default=None, help="DeepSeek-V3.2: no policy "
                   "loss for a completion with A < 0 whose mean (log pi_old - log pi) is above this (e.g. 0.5)")

    g = parser.add_argument_group("cold start: supervised steps before GRPO (DeepSeek-R1)")
    g.add_argument("--sft_steps", type=non_negative_int, default=0, help="steps on the training set's worked "
                   "solutions written in the rewarded format, for a model that never earns a reward; 0 = none")
    g.add_argument("--sft_batch_size", type=positive_int, default=8, help="examples per cold-start step")
    g.add_argument("--sft_learning_rate", type=positive_float, default=5e-5, help="its own AdamW's learning rate")

    g = parser.add_argument_group("LoRA: train low-rank adapters, not the weights (engineering A)")
    g.add_argument("--lora_rank", type=non_negative_int, default=0, help="R > 0: adapters of rank R on --lora_targets, "
                   "every loaded weight frozen (those projections in bf16 with --bf16) and shared with the reference "
                   "model, which copies only the adapters; wants a ~10x larger --learning_rate (e.g. 5e-5). 0 = full "
                   "fine-tuning")
    g.add_argument("--lora_alpha", type=positive_float, default=32.0, help="the adapters' scale is alpha / R")
    g.add_argument("--lora_targets", default=LORA_TARGETS, help="the linear layers that get adapters, by the last "
                   "part of their name; the default: every attention and MLP projection of Qwen2 and Llama")

    g = parser.add_argument_group("evaluation: before and after training (and after a cold start)")
    g.add_argument("--eval_size", type=non_negative_int, default=100, help="held-out questions each time; 0 = none")
    g.add_argument("--eval_steps", type=non_negative_int, default=0, help="and every this many steps; 0 = never")
    g.add_argument("--eval_batch_size", type=positive_int, default=32, help="prompts per greedy generate call")

    g = parser.add_argument_group("output, checkpoints and faults")
    g.add_argument("--output_dir", default="grpo_output",
                   help="where the model, args.json, metrics.jsonl, eval.json and checkpoints are written")
    g.add_argument("--log_completions_steps", type=non_negative_int, default=10,
                   help="print the diagnostics and a sample completion every this many steps; 0 = never")
    g.add_argument("--overwrite_output_dir", action=argparse.BooleanOptionalAction, default=False,
                   help="start again in an --output_dir that holds a run (its checkpoints and metrics are deleted)")
    g.add_argument("--save_steps", type=non_negative_int, default=50, help="save a checkpoint (weights, optimizer, "
                   "reference model, RNG, step) every this many steps; 0 = only at the end and when stopped early")
    g.add_argument("--save_total_limit", type=positive_int, default=2,
                   help="keep only the newest this many checkpoints (for the 1.5B model each is about 22 GB)")
    g.add_argument("--resume_from", default=None, help="carry on from a checkpoint folder, or 'latest' for the "
                   "newest in --output_dir (a finished run: with a larger --num_steps, counted from the run's start); "
                   "the flags that define what is trained must not change, the optimizer's and the output's may")
    g.add_argument("--max_bad_steps", type=positive_int, default=3,
                   help="stop (with a checkpoint) after this many steps in a row with a skipped non-finite update")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked: a bad value or combination exits with status 2 and a one-line message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unused = {"cispo": ["epsilon", "delta"], "sapo": ["epsilon", "epsilon_high", "delta"]}.get(args.loss_type, [])
    unused += [] if args.loss_type == "sapo" else ["sapo_temperature_pos", "sapo_temperature_neg"]
    given = [name for name in unused if getattr(args, name) != parser.get_default(name)]
    if given:
        parser.error(f"--{given[0]} has no effect with --loss_type {args.loss_type} (cispo's one knob is its cap, "
                     "1 + --epsilon_high; sapo's are --sapo_temperature_pos/_neg; --delta is for grpo, dapo, dr_grpo)")
    args.lora_targets = args.lora_targets.replace(" ", "")  # "q_proj, v_proj" as "q_proj,v_proj" (args.json too)
    lora_flags = [name for name in ("lora_alpha", "lora_targets") if getattr(args, name) != parser.get_default(name)]
    if lora_flags and not args.lora_rank:
        parser.error(f"--{lora_flags[0]} has no effect without --lora_rank (0: full fine-tuning, no adapters)")
    if args.epsilon_high is not None and args.epsilon_high < args.epsilon and args.loss_type != "cispo":
        parser.error(f"--epsilon_high {args.epsilon_high} is below --epsilon {args.epsilon}: clip-higher widens "
                     "the range above 1 (DAPO: --epsilon 0.2 --epsilon_high 0.28)")
    high = args.epsilon if args.epsilon_high is None else args.epsilon_high
    if args.delta is not None and args.delta <= 1.0 + high:
        parser.error(f"--delta {args.delta:g} must be above 1 + epsilon_high = {1.0 + high:g}: it caps the ratio "
                     "beyond the clip range, not inside it (INTELLECT-2: --delta 4 with --epsilon 0.2)")
    if args.loss_type == "cispo" and args.epsilon_high is None:
        parser.error("--loss_type cispo caps its weights at 1 + --epsilon_high: give it (ScaleRL, TRL's 5.0: 4)")
    if args.eval_steps and not args.eval_size:
        parser.error(f"--eval_steps {args.eval_steps} evaluates --eval_size held-out questions: give more than 0")
    if args.use_bias_correction_kl and args.beta == 0.0:
        parser.error("--use_bias_correction_kl weighs the KL term, and --beta 0 has none: drop one of the two")
    if args.resume_from and args.overwrite_output_dir:
        parser.error("--resume_from carries a run on and --overwrite_output_dir starts it again: choose one")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if args.batch_size % world_size:
        if int(os.environ.get("RANK", "0")):
            sys.exit(2)  # process 0 says why
        lower = args.batch_size - args.batch_size % world_size
        nearest = " or ".join(str(b) for b in (lower, lower + world_size) if b > 0)
        parser.error(f"--batch_size {args.batch_size} is not divisible by the {world_size} torchrun processes: "
                     f"each process takes the same number of prompts (try --batch_size {nearest})")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """The notebook's last cell: load the model and the data, evaluate, (a cold start and evaluate,) train with
    GRPO, save, evaluate again. Session (engineering D) carries what a real run needs around it: torchrun,
    signals, resume, the output folder, and one line and an exit code for whatever stops the run."""
    args = parse_args(argv)
    with Session(args) as session:
        policy, tokenizer, train_examples, eval_examples = session.load()
        session.evaluate("before", policy, tokenizer, eval_examples)
        if args.sft_steps and not session.resumed:  # a resumed run's checkpoint holds the cold-started weights
            with torch.autocast("cuda", torch.bfloat16, enabled=args.bf16 and args.lora_rank > 0):  # bf16 frozen W
                cold_start(policy, tokenizer, train_examples, steps=args.sft_steps, batch_size=args.sft_batch_size,
                           learning_rate=args.sft_learning_rate, seed=args.seed)
            session.evaluate("after_cold_start", policy, tokenizer, eval_examples)
        # The notebook's training_config: every flag that names a hyperparameter of train_with_grpo or grpo_loss
        names = {*inspect.signature(train_with_grpo).parameters, *inspect.signature(grpo_loss).parameters}
        training_config = {k: v for k, v in vars(args).items() if k in names}
        history = train_with_grpo(policy, tokenizer, train_examples, **training_config, eval_examples=eval_examples,
                                  parallel=session.parallel, run=session.run)
        session.save(policy, tokenizer, history)
        session.evaluate("after", policy, tokenizer, eval_examples)
    return history


if __name__ == "__main__":
    try:
        main()
        exit_process(0)
    except SystemExit as stopped:
        exit_process(stopped.code)
