"""Policy losses for aligning the generator with rewards, over groups of sampled sessions.

For each user the current policy samples a group of G sessions o_1..o_G; each gets a reward r_i
(from the reward model or real reactions). All losses take per-session log-probabilities, the
sum of the session's token log-probs (B, G), and return a scalar to minimize.

    adv = group_advantages(rewards)                                   # (B, G)
    loss = ecpo_loss(logp, logp_old, adv, eps=0.2, delta=0.1)         # OneRec-V1
    loss = gbpo_loss(logp, logp_old, adv)                             # OneRec-V2
    loss = dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta=0.1)

ECPO (Early-Clipped GRPO, OneRec-V1): PPO's clipped surrogate on group-normalized advantages,
where for a negative advantage the old policy is replaced by
    pi'_old = max(sg(pi_theta) / (1 + eps + delta), pi_old),
so the ratio pi_theta / pi'_old is at most 1 + eps + delta: a sample the policy already makes
unlikely cannot blow the gradient up. GBPO (Gradient-Bounded Policy Optimization, OneRec-V2):
no clipping (every sample contributes a gradient), the ratio's denominator bounded like the
gradient of a binary cross-entropy:
    pi'_old = max(pi_old, sg(pi_theta))        for A >= 0
    pi'_old = max(pi_old, 1 - sg(pi_theta))    for A <  0,
so |d ratio / d logit| stays <= 1 (our reading of the report; probabilities are per session).
DPO (baseline): -log sigmoid(beta * ((logp_w - ref_w) - (logp_l - ref_l))) over preference pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rewards (B, G) -> (r - mean) / std within each user's group; a group whose rewards are all
    equal carries no preference and gets 0."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (B, G) with G >= 2 sessions per user, got {tuple(rewards.shape)}")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    return torch.where(std > eps, (rewards - mean) / std.clamp(min=eps), torch.zeros_like(rewards))


def ecpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, eps: float = 0.2,
              delta: float = 0.1) -> torch.Tensor:
    """logp, logp_old, adv (B, G) -> scalar: -mean(min(ratio * A, clip(ratio, 1-eps, 1+eps) * A))."""
    logp_old = logp_old.detach()
    early = logp.detach() - torch.log1p(torch.tensor(eps + delta, device=logp.device))   # sg(pi)/(1+eps+delta)
    denom = torch.where(adv < 0, torch.maximum(early, logp_old), logp_old)
    ratio = torch.exp(logp - denom)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    return -surrogate.mean()


def gbpo_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """logp, logp_old, adv (B, G) -> scalar: -mean(pi / pi'_old * A), pi'_old bounded as above."""
    logp_old, p = logp_old.detach(), logp.detach()
    one_minus = torch.log1p(-p.exp().clamp(max=1 - 1e-6))                    # log(1 - sg(pi))
    denom = torch.where(adv >= 0, torch.maximum(logp_old, p), torch.maximum(logp_old, one_minus))
    return -(torch.exp(logp - denom) * adv).mean()


def dpo_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """(P,) each -> scalar: -mean(log sigmoid(beta * (chosen margin - rejected margin)))."""
    margin = (logp_chosen - ref_chosen.detach()) - (logp_rejected - ref_rejected.detach())
    return -F.logsigmoid(beta * margin).mean()
