"""The simulated users' response model: the rating a MovieLens user would give an item shown.

    model = ResponseModel.fit(seen_ratings, cfg.simulate, seed=cfg.seed)
    model.predict(users, items)                     # (n,) expected ratings in [1, 5]
    model.sample(users, items, rng)                 # (n,) integer ratings 1..5, noise included
    report = calibration(model, seen_ratings, heldout_ratings)

Biased matrix factorization, r(u, i) = mu + b_u + b_i + p_u . q_i, fitted with full-batch Adam
and L2 (per rating) on the ratings the models trained on, early-stopped on a random 5 % of them.
A user or item never seen in fitting gets only the terms it has (mu + b_i for a new user).
`sample` adds Gaussian noise of the validation residual's size and rounds to 1..5, so modelled
reactions spread like real ones instead of all sitting at the mean.

`calibration` scores the model on held-out real ratings (the time-split holdout: later than
every rating it was fitted on): RMSE, and AUC of the predicted rating for "rated >= 4", beside
the popularity baseline (an item's mean seen rating for RMSE, its number of seen ratings for AUC).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from onerec.config import SimulateConfig
from onerec.eval.metrics import binary_auc

LIKED = 4.0              # a rating at or above this is a "like" (the AUC's positive class)
VALID_SHARE = 0.05
PATIENCE = 20            # epochs without a better validation RMSE before stopping


@dataclass(frozen=True)
class ResponseModel:
    mean: float
    user_ids: np.ndarray          # (U,) sorted raw ids
    item_ids: np.ndarray          # (I,) sorted raw ids
    user_bias: np.ndarray         # (U,)
    item_bias: np.ndarray         # (I,)
    user_vec: np.ndarray          # (U, d)
    item_vec: np.ndarray          # (I, d)
    noise: float                  # residual RMSE on the validation ratings
    epochs: int

    @classmethod
    def fit(cls, ratings: pd.DataFrame, cfg: SimulateConfig, seed: int, progress: bool = False) -> ResponseModel:
        """ratings: user_id, item_id, rating (1..5)."""
        _check_ratings(ratings)
        user_ids, u = np.unique(ratings["user_id"].to_numpy(), return_inverse=True)
        item_ids, i = np.unique(ratings["item_id"].to_numpy(), return_inverse=True)
        r = torch.tensor(ratings["rating"].to_numpy(), dtype=torch.float32)
        g = torch.Generator().manual_seed(seed)
        valid = torch.rand(len(r), generator=g) < VALID_SHARE
        u, i = torch.as_tensor(u), torch.as_tensor(i)
        mean = float(r[~valid].mean())
        d = cfg.response_dim
        params = {"bu": torch.zeros(len(user_ids)), "bi": torch.zeros(len(item_ids)),
                  "p": 0.1 * torch.randn(len(user_ids), d, generator=g),
                  "q": 0.1 * torch.randn(len(item_ids), d, generator=g)}
        for t in params.values():
            t.requires_grad_()
        opt = torch.optim.Adam(params.values(), lr=cfg.response_lr)

        def predict(rows):                                   # (n,) for a boolean row mask
            bu, bi, p, q = params["bu"][u[rows]], params["bi"][i[rows]], params["p"][u[rows]], params["q"][i[rows]]
            return mean + bu + bi + (p * q).sum(1), (bu, bi, p, q)

        best, best_state, stale, epoch = math.inf, None, 0, 0
        for epoch in tqdm(range(1, cfg.response_epochs + 1), desc="response model", unit="epoch",
                          disable=not progress):
            pred, (bu, bi, p, q) = predict(~valid)
            l2 = bu.square() + bi.square() + p.square().sum(1) + q.square().sum(1)
            loss = ((pred - r[~valid]).square() + cfg.response_l2 * l2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                rmse = float((predict(valid)[0].clamp(1, 5) - r[valid]).square().mean().sqrt())
            if rmse < best - 1e-5:
                best, best_state, stale = rmse, {k: v.detach().clone() for k, v in params.items()}, 0
            else:
                stale += 1
                if stale >= PATIENCE:
                    break
        s = best_state
        return cls(mean, user_ids, item_ids, s["bu"].numpy(), s["bi"].numpy(), s["p"].numpy(), s["q"].numpy(),
                   best, epoch)

    def predict(self, users, items) -> np.ndarray:
        """Expected ratings (n,) in [1, 5]; unknown users / items contribute no terms."""
        uu, known_u = _lookup(self.user_ids, users)
        ii, known_i = _lookup(self.item_ids, items)
        out = np.full(len(uu), self.mean)
        out += np.where(known_u, self.user_bias[uu], 0.0) + np.where(known_i, self.item_bias[ii], 0.0)
        both = known_u & known_i
        out[both] += (self.user_vec[uu[both]] * self.item_vec[ii[both]]).sum(1)
        return np.clip(out, 1.0, 5.0)

    def sample(self, users, items, rng: np.random.Generator) -> np.ndarray:
        """Integer ratings (n,) in 1..5: the expectation plus N(0, noise^2), rounded."""
        noisy = self.predict(users, items) + rng.normal(0.0, self.noise, size=len(np.atleast_1d(users)))
        return np.clip(np.rint(noisy), 1, 5).astype(np.int64)


def _lookup(ids: np.ndarray, raw) -> tuple[np.ndarray, np.ndarray]:
    raw = np.atleast_1d(np.asarray(raw, dtype=np.int64))
    pos = np.minimum(np.searchsorted(ids, raw), len(ids) - 1)
    return pos, ids[pos] == raw


def _check_ratings(ratings: pd.DataFrame) -> None:
    missing = [c for c in ("user_id", "item_id", "rating") if c not in ratings.columns]
    if missing:
        raise ValueError(f"ratings lack column(s) {missing}")
    values = ratings["rating"].to_numpy(dtype=float)
    if not len(values) or not np.isfinite(values).all() or ((values < 1) | (values > 5)).any():
        raise ValueError("ratings must be a non-empty set of finite values in 1..5 (explicit ratings: ml-100k)")


def calibration(model: ResponseModel, seen: pd.DataFrame, heldout: pd.DataFrame) -> dict:
    """The model against held-out real ratings, beside the popularity baseline (see module doc)."""
    _check_ratings(heldout)
    truth = heldout["rating"].to_numpy(dtype=float)
    pred = model.predict(heldout["user_id"], heldout["item_id"])
    stats = seen.groupby("item_id")["rating"].agg(["mean", "size"])
    item_mean = heldout["item_id"].map(stats["mean"]).fillna(float(seen["rating"].mean())).to_numpy()
    item_count = heldout["item_id"].map(stats["size"]).fillna(0).to_numpy()
    liked = truth >= LIKED

    def rmse(x):
        return round(float(np.sqrt(np.mean((x - truth) ** 2))), 4)

    return {"heldout_ratings": int(len(truth)), "heldout_liked_share": round(float(liked.mean()), 4),
            "response_rmse": rmse(pred), "popularity_rmse": rmse(item_mean),
            "response_auc": round(binary_auc(pred, liked), 4), "popularity_auc": round(binary_auc(item_count, liked), 4),
            "response_noise": round(model.noise, 4), "response_epochs": model.epochs}
