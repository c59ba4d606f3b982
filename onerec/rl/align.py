"""Preference alignment: the generator samples a group of items per user, a reward function
scores them, and a policy loss (ECPO, GBPO, or DPO as the baseline) moves probability towards
the better ones, with a KL term against the frozen reference (the starting champion).

    aligned, log = align(policy, contexts, users, trie, reward_fn, cfg.align, seed=cfg.seed)

One step, for a batch of B users (shapes):
    rows, codes = sample_items(policy, ctx, trie, G)   # (B, G) catalogue rows, (B, G, L) codes,
                                                       # sampled level by level among valid prefixes
    r = reward_fn(user index, rows)                    # (B, G), e.g. the reward model's scores
    A = group_advantages(r)                            # (B, G)
    logp_old = logp(policy, codes) at sampling time    # (B, G), no grad
    for each of `inner_steps`: loss = ECPO/GBPO(logp, logp_old, A) + kl_coef * KL(policy || ref)
DPO pairs each user's best and worst sample of the group (ties skipped).

Simplification: a sample is one item (the next-item task the predictor serves), not a whole
multi-item session. Its log-prob is the serving score: the sum of its L token log-probs, plus
dense_score_weight x the dense head's log-softmax for the hybrid (so the head, which dominates the
hybrid's ranking, is aligned too).

Samplers (align.sampler): "tokens" draws token by token from the decoder's distribution under the
trie; "served" (the hybrid) draws from softmax(serving score / temperature) over the dense head's
top align.candidates items, the distribution whose top the predictor serves. With the hybrid the
token distribution is not what is served (its ranking is the head's, x dense_score_weight), so
"tokens" spends the group on items the predictor would never show and the policy ratio compares a
sample against a score it was not drawn from; "served" keeps alignment on-policy.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
import torch

from onerec.config import AlignConfig
from onerec.model.beam import context_only, item_logp, eval_mode
from onerec.rl.losses import dpo_loss, ecpo_loss, gbpo_loss, group_advantages

RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (B,) users, (B, G) rows -> (B, G)


@torch.no_grad()
def sample_items(model, context: dict, trie, group: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """G items per user, each drawn token by token from the model's distribution restricted to
    valid prefixes -> rows (B, G) (catalogue rows, item index - 1) and codes (B, G, L)."""
    with eval_mode(model):
        memory = model.encode(context_only(context))
        b = memory.key_mask.shape[0]                                           # G rows per user share its memory
        ids = torch.full((b * group, 1), model.emb.bos_id, dtype=torch.long, device=memory.key_mask.device)
        tokens = ids.new_zeros(b * group, 0)
        for level in range(model.n_levels):
            h, _ = model.decode(ids, memory)                                   # (B*G, 1 + level, D)
            logits = model.logits(h[:, -1], level).float() / temperature       # (B*G, K_l)
            logits = logits.masked_fill(~trie.allowed(tokens).to(logits.device), float("-inf"))
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            tokens = torch.cat([tokens, token[:, None]], 1)
            ids = torch.cat([ids, model.emb.ids(token, level)[:, None]], 1)
        rows = trie.item_of(tokens)
    return rows.view(b, group), tokens.view(b, group, model.n_levels)


@torch.no_grad()
def sample_served(model, context: dict, item_codes: torch.Tensor, group: int, candidates: int,
                  temperature: float = 1.0, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """G distinct items per user from softmax(serving score / temperature) over the dense head's
    top `candidates` items -> rows (B, G), codes (B, G, L). item_codes: (N, L), row r's code."""
    if model.dense is None:
        raise ValueError("the 'served' sampler needs the hybrid's dense head (model.dense_loss_weight > 0)")
    with eval_mode(model):
        memory = model.encode(context_only(context))
        dense = model.head_logits(memory).float().log_softmax(-1)                     # (B, N)
        m = min(candidates, dense.shape[1])
        if group > m:
            raise ValueError(f"align.group_size={group} is above the {m} candidates to draw from")
        cand = dense.topk(m, dim=1).indices                                             # (B, M) rows
        codes = item_codes.to(cand.device)[cand]                                        # (B, M, L)
        score = item_logp(model, memory, codes) + model.cfg.dense_score_weight * dense.gather(1, cand)
        pick = torch.multinomial((score / temperature).softmax(-1).cpu(), group, replacement=False,
                                 generator=generator).to(cand.device)                   # (B, G)
    rows = cand.gather(1, pick)
    return rows, codes.gather(1, pick[..., None].expand(-1, -1, codes.shape[-1]))


def sample_logp(model, context: dict, codes: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """codes (B, G, L) -> (B, G) the serving score of each sample under `model` (with grad when
    enabled): its token log-probs, + dense_score_weight x the dense head's log-softmax at its row
    for the hybrid (what `topk_next_items` ranks by, so alignment moves what is served)."""
    memory = model.encode(context_only(context))
    logp = item_logp(model, memory, codes)
    weight = model.cfg.dense_score_weight if model.dense is not None else 0.0
    if weight and rows is not None:
        dense = model.head_logits(memory).log_softmax(-1)                     # (B, N)
        logp = logp + weight * dense.gather(1, rows.clamp(min=0))
    return logp


def align(policy, contexts: list[dict], users: list[torch.Tensor], trie, reward_fn: RewardFn, cfg: AlignConfig,
          seed: int, progress: Callable[[int, dict], None] | None = None, item_codes: torch.Tensor | None = None):
    """contexts[i], users[i]: batch i's context tensors and user indices; batches are cycled for
    cfg.steps rounds; item_codes (N, L): row r's code, for the "served" sampler. -> (the aligned
    copy of policy, per-round log: mean sampled reward, loss, KL)."""
    if cfg.sampler == "served" and item_codes is None:
        raise ValueError("align.sampler 'served' needs item_codes (N, L)")
    reference = copy.deepcopy(policy).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    policy = copy.deepcopy(policy).eval()
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)
    log = []
    for step in range(cfg.steps):
        ctx, user = contexts[step % len(contexts)], users[step % len(users)]
        if cfg.sampler == "served":
            rows, codes = sample_served(policy, ctx, item_codes, cfg.group_size, cfg.candidates, cfg.temperature, g)
        else:
            rows, codes = sample_items(policy, ctx, trie, cfg.group_size, cfg.temperature, g)
        with torch.no_grad():
            rewards = reward_fn(user, rows).float()                            # (B, G)
            logp_old = sample_logp(policy, ctx, codes, rows)
            ref = sample_logp(reference, ctx, codes, rows)
        adv = group_advantages(rewards)
        for _ in range(cfg.inner_steps):        # eval mode throughout: no dropout, so ratio 1 = on-policy
            logp = sample_logp(policy, ctx, codes, rows)
            kl = (torch.exp(ref - logp) - (ref - logp) - 1).mean()           # k3 estimator, >= 0
            loss = _policy_loss(cfg, logp, logp_old, adv, ref, rewards) + cfg.kl_coef * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
        row = {"step": step, "mean_reward": float(rewards.mean()), "loss": float(loss.detach()), "kl": float(kl.detach())}
        log.append(row)
        if progress:
            progress(step, row)
    return policy.eval(), log


def _policy_loss(cfg: AlignConfig, logp, logp_old, adv, ref, rewards) -> torch.Tensor:
    if cfg.method == "ecpo":
        return ecpo_loss(logp, logp_old, adv, cfg.clip_eps, cfg.clip_delta)
    if cfg.method == "gbpo":
        return gbpo_loss(logp, logp_old, adv)
    best, worst = rewards.argmax(1), rewards.argmin(1)                         # DPO: best vs worst
    keep = rewards.gather(1, best[:, None])[:, 0] > rewards.gather(1, worst[:, None])[:, 0]
    if not keep.any():
        return logp.sum() * 0.0
    pick = torch.arange(len(best))[keep]
    return dpo_loss(logp[pick, best[keep]], logp[pick, worst[keep]], ref[pick, best[keep]], ref[pick, worst[keep]],
                    cfg.dpo_beta)
