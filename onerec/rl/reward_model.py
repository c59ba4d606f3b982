"""The reward model: P-Score-style multi-task towers over (user, item), trained on the joined
exposure rows (onerec/stream/rewards.py), read by alignment to score sampled sessions.

    examples = reward_examples(load_rewards(cfg))             # one row per (exposure, reacted item)
    train, test = time_slices(examples, test_share=0.2)       # the test slice is the latest
    model, fit = train_reward_model(train, item_features, cfg.reward_model, seed=cfg.seed)
    report = evaluate_reward_model(model, train, test)        # AUC beside constant and popularity
    model.score(users, items)                                 # (n,) expected reward in [-1, 1]

Architecture (shapes for a batch of n pairs, d = cfg.dim):
    user tower  e_u = Emb(hash(user))                                   (n, d)
    item tower  e_i = Emb(hash(item)) + mean(Emb(attributes of item))   (n, d)
    shared      h = MLP([e_u, e_i, e_u * e_i])                          (n, d)
    heads       like logit (BCE on reward >= LIKE_AT) and reward (MSE, tanh to [-1, 1])
The towers meet only in the shared layers (as P-Score fuses user and item signals); one head per
task, the loss their sum. Ids are hashed into `buckets` rows, so users and items that appear
after training still get a (shared, untrained) row instead of an error.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from onerec.config import RewardModelConfig
from onerec.eval.metrics import binary_auc
from onerec.model.beam import eval_mode

LIKE_AT = 0.5            # a reward at or above this is a like: a rating of 4 or 5


def reward_examples(rows: pd.DataFrame) -> pd.DataFrame:
    """Joined exposure rows -> one example per reacted item: user_id, item_id, position, reward,
    served_ms (items without a reaction carry no label and are left out)."""
    out = []
    for r in rows.itertuples(index=False):
        for pos, (item, reward) in enumerate(zip(r.items, r.rewards)):
            if reward is not None and not (isinstance(reward, float) and np.isnan(reward)):
                out.append((int(r.user_id), int(item), pos, float(reward), int(r.served_ms)))
    return pd.DataFrame(out, columns=["user_id", "item_id", "position", "reward", "served_ms"])


def time_slices(examples: pd.DataFrame, test_share: float = 0.2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(earlier, latest test_share) by served time: the test slice is later than all training."""
    ordered = examples.sort_values("served_ms", kind="stable").reset_index(drop=True)
    cut = int(round(len(ordered) * (1 - test_share)))
    if not 0 < cut < len(ordered):
        raise ValueError(f"{len(ordered)} examples cannot be cut into train and a {test_share:.0%} test slice")
    return ordered.iloc[:cut], ordered.iloc[cut:]


class RewardModel(nn.Module):
    def __init__(self, cfg: RewardModelConfig, item_attributes: torch.Tensor | None = None,
                 attribute_items: np.ndarray | None = None):
        """item_attributes (I, A) attribute ids 1..n (0 = none) of the raw items in attribute_items (I,)."""
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.user = nn.Embedding(cfg.buckets, d)
        self.item = nn.Embedding(cfg.buckets, d)
        n_attr = int(item_attributes.max()) + 1 if item_attributes is not None and item_attributes.numel() else 1
        self.attr = nn.Embedding(n_attr, d, padding_idx=0)
        self.register_buffer("attributes", item_attributes if item_attributes is not None
                             else torch.zeros(0, 1, dtype=torch.long))
        self.register_buffer("attribute_items", torch.as_tensor(
            attribute_items if attribute_items is not None else np.zeros(0), dtype=torch.long))
        self.shared = nn.Sequential(nn.Linear(3 * d, d), nn.ReLU(), nn.Linear(d, d), nn.ReLU())
        self.like_head, self.reward_head = nn.Linear(d, 1), nn.Linear(d, 1)
        for emb in (self.user, self.item, self.attr):
            nn.init.normal_(emb.weight, std=0.05)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n,) raw ids each -> (like logit (n,), reward (n,) in [-1, 1])."""
        e_u = self.user(users % self.cfg.buckets)
        e_i = self.item(items % self.cfg.buckets) + self._attribute_vectors(items)
        h = self.shared(torch.cat([e_u, e_i, e_u * e_i], dim=-1))
        return self.like_head(h)[:, 0], torch.tanh(self.reward_head(h)[:, 0])

    def _attribute_vectors(self, items: torch.Tensor) -> torch.Tensor:
        if not len(self.attribute_items):
            return 0.0
        pos = torch.searchsorted(self.attribute_items, items).clamp(max=len(self.attribute_items) - 1)
        known = self.attribute_items[pos] == items
        attrs = torch.where(known[:, None], self.attributes[pos], torch.zeros_like(self.attributes[pos]))
        return F.embedding_bag(attrs, self.attr.weight, mode="mean", padding_idx=0)

    @torch.no_grad()
    def predict(self, users, items) -> tuple[np.ndarray, np.ndarray]:
        """Raw (user, item) pairs -> (like probability (n,), expected reward (n,) in [-1, 1])."""
        with eval_mode(self):
            logit, reward = self(torch.as_tensor(np.asarray(users), dtype=torch.long),
                                 torch.as_tensor(np.asarray(items), dtype=torch.long))
        return torch.sigmoid(logit).numpy(), reward.numpy()

    def score(self, users, items) -> np.ndarray:
        """Expected reward (n,) in [-1, 1]: what alignment maximizes."""
        return self.predict(users, items)[1]

    def like_probability(self, users, items) -> np.ndarray:
        return self.predict(users, items)[0]


def item_attribute_table(items: pd.DataFrame, column: str = "genres") -> tuple[torch.Tensor, np.ndarray]:
    """The data set's items table -> ((I, A) attribute ids 1..n, 0 = none; (I,) sorted raw ids)."""
    items = items.sort_values("item_id")
    lists = [list(v) if isinstance(v, (list, tuple, np.ndarray)) else [] for v in items[column]]
    vocab = {a: k + 1 for k, a in enumerate(sorted({a for row in lists for a in row}))}
    width = max(1, max((len(row) for row in lists), default=1))
    table = torch.zeros(len(lists), width, dtype=torch.long)
    for r, row in enumerate(lists):
        table[r, :len(row)] = torch.tensor([vocab[a] for a in row], dtype=torch.long)
    return table, items["item_id"].to_numpy(dtype=np.int64)


def train_reward_model(train: pd.DataFrame, item_attributes: tuple[torch.Tensor, np.ndarray] | None,
                       cfg: RewardModelConfig, seed: int) -> tuple[RewardModel, dict]:
    """Adam on the sum of the two task losses, shuffled mini-batches, early-stopped on the loss of
    the latest cfg.valid_share of `train` (by served time); -> (the best model, its figures)."""
    if len(train) < 2:
        raise ValueError("no reward examples to train on: join some exposures first (`onerec rewards join`)")
    torch.manual_seed(seed)
    model = RewardModel(cfg, *(item_attributes or (None, None)))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    fit, valid = time_slices(train, cfg.valid_share) if len(train) >= 20 else (train, train)
    (users, items, reward), held = _tensors(fit), _tensors(valid)
    g = torch.Generator().manual_seed(seed)
    best, best_state, stale, epochs = -float("inf"), None, 0, 0
    for epochs in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(users), generator=g)
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            loss = _loss(model, users[idx], items[idx], reward[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        score = _valid_score(model, *held)
        if score > best + 1e-4:
            best, best_state, stale = score, {k: v.clone() for k, v in model.state_dict().items()}, 0
        elif (stale := stale + 1) >= cfg.patience:
            break
    model.load_state_dict(best_state)
    return model.eval(), {"epochs": epochs, "valid_auc": round(best, 4)}


def _valid_score(model: RewardModel, users, items, reward) -> float:
    """The like head's AUC (what ranks sessions for alignment), or -loss without both classes."""
    liked = (reward >= LIKE_AT).numpy()
    with torch.no_grad():
        if liked.any() and (~liked).any():
            return binary_auc(model(users, items)[0].numpy(), liked)
        return -float(_loss(model, users, items, reward))


def _tensors(frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(frame["user_id"].to_numpy(), dtype=torch.long),
            torch.as_tensor(frame["item_id"].to_numpy(), dtype=torch.long),
            torch.as_tensor(frame["reward"].to_numpy(), dtype=torch.float32))


def _loss(model: RewardModel, users, items, reward) -> torch.Tensor:
    logit, pred = model(users, items)
    return F.binary_cross_entropy_with_logits(logit, (reward >= LIKE_AT).float()) + F.mse_loss(pred, reward)


def evaluate_reward_model(model: RewardModel, train: pd.DataFrame, test: pd.DataFrame) -> dict:
    """On the later test slice: AUC of the like probability for reward >= LIKE_AT and RMSE of the
    reward, beside a constant predictor (the train mean: AUC 0.5) and popularity (each item's
    mean train reward)."""
    truth = test["reward"].to_numpy()
    liked = truth >= LIKE_AT
    p_like = model.like_probability(test["user_id"], test["item_id"])
    pred = model.score(test["user_id"], test["item_id"])
    mean = float(train["reward"].mean())
    popular = test["item_id"].map(train.groupby("item_id")["reward"].mean()).fillna(mean).to_numpy()

    def rmse(x):
        return round(float(np.sqrt(np.mean((x - truth) ** 2))), 4)

    both = bool(liked.any() and (~liked).any())
    return {"train_examples": int(len(train)), "test_examples": int(len(test)),
            "test_liked_share": round(float(liked.mean()), 4),
            "reward_model_auc": round(binary_auc(p_like, liked), 4) if both else None,
            "popularity_auc": round(binary_auc(popular, liked), 4) if both else None, "constant_auc": 0.5,
            "reward_model_rmse": rmse(pred), "popularity_rmse": rmse(popular), "constant_rmse": rmse(np.full(len(truth), mean))}
