"""Reward shaping and the alignment losses against hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from onerec.rl.losses import dpo_loss, ecpo_loss, gbpo_loss, group_advantages
from onerec.rl.rewards import UNKNOWN_LENGTH, DurationShaper, length_bucket, rating_reward

# --------------------------------------------------------------------------- rewards


@pytest.mark.parametrize("rating, reward", [(5, 1.0), (4, 0.5), (3, 0.0), (2, -0.5), (1, -1.0), (4.5, 0.75)])
def test_ratings_map_to_rewards_around_the_neutral_rating(rating, reward):
    assert rating_reward(rating) == pytest.approx(reward)


def test_a_non_finite_rating_is_refused():
    with pytest.raises(ValueError, match="finite"):
        rating_reward(float("nan"))


@pytest.mark.parametrize("duration, beta, bucket", [
    (1.0, 2.0, 0), (3.9, 2.0, 1), (4.0, 2.0, 2), (1000.0, 10.0, 2), (0.5, 2.0, -1),
    (None, 2.0, UNKNOWN_LENGTH), (0.0, 2.0, UNKNOWN_LENGTH), (-3.0, 2.0, UNKNOWN_LENGTH),
])
def test_items_are_bucketed_by_floor_log_beta_of_their_length(duration, beta, bucket):
    assert length_bucket(duration, beta) == bucket


def shaper() -> DurationShaper:
    # bucket 5 (32..63 s long): plays 1..4 s; bucket 8 (256..511 s): plays 100..400 s; unknown: 7 s
    return DurationShaper.fit([40, 40, 40, 40, 300, 300, 300, 300, None],
                              [1, 2, 3, 4, 100, 200, 300, 400, 7], beta=2.0)


def test_play_time_quantiles_are_taken_within_the_length_bucket():
    s = shaper()
    assert s.quantile(40, 4) == pytest.approx(3.5 / 4)             # best of its bucket
    assert s.quantile(300, 100) == pytest.approx(0.5 / 4)         # worst of its bucket ...
    assert s.quantile(300, 100) < s.quantile(40, 4)               # ... though 25x longer
    assert s.quantile(40, 2.5) == pytest.approx(2 / 4)            # between plays
    assert s.quantile(None, 7) == pytest.approx(0.5)              # the unknown-length bucket
    assert s.quantile(5000, 3) == pytest.approx(2.5 / 9)          # unseen bucket: all 9 plays


def test_top_quartile_is_positive_negatives_and_zero_plays_are_minus_one():
    s = shaper()
    assert s.reward(300, 400) == 1.0 and s.reward(40, 4) == 1.0
    assert s.reward(300, 200) == 0.0
    assert s.reward(300, 0.0) == -1.0 and s.reward(300, None) == -1.0
    assert s.reward(300, 400, negative=True) == -1.0


def test_fit_refuses_bad_inputs():
    with pytest.raises(ValueError, match="beta"):
        DurationShaper.fit([1], [1], beta=1.0)
    with pytest.raises(ValueError, match="as many"):
        DurationShaper.fit([1, 2], [1])
    with pytest.raises(ValueError, match="finite"):
        DurationShaper.fit([1], [float("inf")])


# --------------------------------------------------------------------------- losses


def test_group_advantages_normalize_within_each_user_and_flat_groups_get_zero():
    adv = group_advantages(torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    s = math.sqrt(2 / 3)
    torch.testing.assert_close(adv, torch.tensor([[-1 / s, 0.0, 1 / s], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_ecpo_on_policy_is_minus_the_mean_advantage_and_its_gradient():
    logp = torch.log(torch.tensor([[0.2, 0.5]])).requires_grad_()
    adv = torch.tensor([[1.0, -1.0]])
    loss = ecpo_loss(logp, logp.detach(), adv, eps=0.2, delta=0.1)
    assert loss.item() == pytest.approx(0.0)                      # ratio 1: -(1 * 1 + 1 * -1) / 2
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[-0.5, 0.5]]))   # d/dlogp of -ratio * A / 2


def test_ecpo_clips_a_positive_ratio_and_early_clips_a_negative_one():
    # positive A, ratio 2 > 1 + eps: the clipped term wins, no gradient
    logp = torch.log(torch.tensor([[0.4]])).requires_grad_()
    loss = ecpo_loss(logp, torch.log(torch.tensor([[0.2]])), torch.tensor([[1.0]]), eps=0.2, delta=0.1)
    assert loss.item() == pytest.approx(-1.2)
    assert torch.autograd.grad(loss, logp)[0].item() == 0.0
    # negative A, the policy 10x the old one: PPO's ratio would be 10; ECPO's old policy becomes
    # pi / 1.3, so the ratio is 1.3 and min(1.3 * -1, clip(1.3) * -1) = -1.3
    logp = torch.log(torch.tensor([[0.5]])).requires_grad_()
    loss = ecpo_loss(logp, torch.log(torch.tensor([[0.05]])), torch.tensor([[-1.0]]), eps=0.2, delta=0.1)
    assert loss.item() == pytest.approx(1.3)
    assert torch.autograd.grad(loss, logp)[0].item() == pytest.approx(1.3)   # bounded, not 10


def test_gbpo_bounds_the_ratio_like_a_bce_gradient():
    old = torch.log(torch.tensor([[0.1, 0.1, 0.6]]))
    logp = torch.log(torch.tensor([[0.4, 0.05, 0.3]])).requires_grad_()
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss = gbpo_loss(logp, old, adv)
    # A >= 0: pi / max(pi_old, pi): 0.4/0.4 = 1, 0.05/0.1 = 0.5; A < 0: 0.3 / max(0.6, 0.7) = 3/7
    ratios = torch.tensor([1.0, 0.5, 0.3 / 0.7])
    assert loss.item() == pytest.approx(-(ratios * adv[0]).mean().item())
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -(ratios * adv[0])[None] / 3)
    assert grad.abs().max() <= 1 / 3 + 1e-6                       # every ratio <= 1


def test_dpo_loss_matches_the_formula_and_prefers_the_chosen():
    chosen, rejected = torch.tensor([-1.0, -2.0], requires_grad=True), torch.tensor([-3.0, -1.0])
    ref_c, ref_r = torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0])
    loss = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.5)
    margins = torch.tensor([(1.0 - -1.0), (0.0 - 1.0)])            # (chosen - ref) - (rejected - ref)
    expected = -torch.nn.functional.logsigmoid(0.5 * margins).mean()
    assert loss.item() == pytest.approx(expected.item())
    (grad,) = torch.autograd.grad(loss, chosen)
    assert (grad < 0).all()                                        # raising the chosen lowers the loss
