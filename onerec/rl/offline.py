"""`onerec align`: align a saved model with a reward model and check it offline against the
users' held-out real ratings.

    report = align_saved_model(cfg, model_dir, out_dir, rewards="ratings")

Steps: the reward model is trained on reward examples, either the joined exposure rows in the
offline store (`rewards="joined"`: what the live loop collected) or the seen real ratings mapped
to rewards (`rewards="ratings"`: no serving needed; the reward model then scores how much a user
would like an item); the policy samples groups for users drawn from those with seen histories
and is updated by cfg.align.method; the aligned model is saved beside its tokenizer (servable,
registrable). Then, for every user with held-out ratings (the time-split holdout, later than all
training), both models recommend k items from the user's seen history and we report:
  - liked_share@k: among recommended items the user really rated in the holdout, the share
    rated >= 4 (and how many such items there were), champion vs aligned;
  - expected_reward@k: the reward model's mean score of the recommended items.
The first is the honest number (real reactions no model saw); the second is what the policy
optimized, so it rises by construction.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from onerec.config import Config

LIKED_RATING = 4.0


def seen_and_holdout(cfg: Config) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(seen ratings sorted by user and time, holdout ratings, the items table)."""
    from onerec.data import load_dataset, online_split

    ds = load_dataset(cfg.data)
    split = online_split(ds.interactions, cfg.data)
    seen = pd.concat([split.history, split.live]).sort_values(["user_id", "timestamp"], kind="stable")
    if split.holdout.empty:
        raise ValueError("data.holdout_fraction is 0: simulated users and the offline check need held-out real ratings")
    return seen.reset_index(drop=True), split.holdout, ds.items


def rating_examples(ratings: pd.DataFrame) -> pd.DataFrame:
    """Real ratings -> reward examples (the reward model's input format)."""
    from onerec.rl.rewards import rating_reward

    return pd.DataFrame({"user_id": ratings["user_id"].to_numpy(), "item_id": ratings["item_id"].to_numpy(),
                         "position": 0, "reward": [rating_reward(r) for r in ratings["rating"]],
                         "served_ms": ratings["timestamp"].to_numpy() * 1000})


def recommend(served, histories: list[list[int]], k: int, beam: int, head_k: int | None = None,
              batch: int = 64) -> np.ndarray:
    """(U, k) raw item ids from each user's history (raw ids, oldest first), as served."""
    out = []
    for start in range(0, len(histories), batch):
        known = served.histories(histories[start:start + batch])
        out.append(served.top_items(known, k, beam, head_k)[0])
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


def offline_check(served, reward_model, users: list[int], histories: list[list[int]], holdout: pd.DataFrame,
                  k: int, beam: int, head_k: int | None = None) -> dict:
    recs = recommend(served, histories, k, beam, head_k)                                  # (U, k)
    rated = {(int(u), int(i)): float(r) for u, i, r in zip(holdout["user_id"], holdout["item_id"], holdout["rating"])}
    hits = [rated[(u, int(i))] for u, row in zip(users, recs) for i in row if (u, int(i)) in rated]
    expected = reward_model.score(np.repeat(users, recs.shape[1]), recs.reshape(-1))
    return {f"rated_in_holdout@{k}": len(hits),
            f"liked_share@{k}": round(float(np.mean(np.array(hits) >= LIKED_RATING)), 4) if hits else None,
            f"mean_holdout_rating@{k}": round(float(np.mean(hits)), 4) if hits else None,
            f"expected_reward@{k}": round(float(expected.mean()), 4)}


def align_saved_model(cfg: Config, model_dir: str | Path, out_dir: str | Path, rewards: str = "ratings",
                      progress: Callable[[str], None] = lambda msg: None, as_of: str = "") -> dict:
    """as_of: with rewards="joined", only rows served up to this time (ISO 8601; '' = all)."""
    from onerec.model.data import context_batch
    from onerec.model.train import load_model, save_model
    from onerec.rl.align import align
    from onerec.rl.reward_model import (evaluate_reward_model, item_attribute_table, reward_examples, time_slices,
                                        train_reward_model)
    from onerec.serve import ServedModel

    seen, holdout, items = seen_and_holdout(cfg)
    if rewards == "joined":
        from onerec.stream.rewards import load_rewards

        rows = load_rewards(cfg)
        if as_of:
            rows = rows[rows["served_ms"] <= pd.Timestamp(as_of).value // 1_000_000]
        examples = reward_examples(rows)
    elif rewards == "ratings":
        examples = rating_examples(seen)
    else:
        raise ValueError(f"rewards must be 'joined' or 'ratings', got {rewards!r}")
    progress(f"reward model on {len(examples):,} examples ({rewards})")
    rm_train, rm_test = time_slices(examples, 0.2)
    attributes = item_attribute_table(items) if "genres" in items.columns else None
    reward_model, fit = train_reward_model(rm_train, attributes, cfg.reward_model, cfg.seed)
    report = {"reward_source": rewards, **fit, **evaluate_reward_model(reward_model, rm_train, rm_test)}
    reward_model, _ = train_reward_model(examples, attributes, cfg.reward_model, cfg.seed)   # all of it, for alignment

    champion = ServedModel.from_dir(model_dir, "champion", "champion")
    _, tokenizer = load_model(model_dir)
    by_user = {int(u): g["item_id"].tolist() for u, g in seen.groupby("user_id", sort=True)}
    rng = np.random.default_rng(cfg.seed)
    train_users = [int(u) for u in rng.permutation(sorted(by_user))]
    contexts, user_batches = [], []
    for start in range(0, len(train_users), cfg.align.batch_users):
        chunk = train_users[start:start + cfg.align.batch_users]
        contexts.append(context_batch(champion.histories([by_user[u] for u in chunk]), champion.codes,
                                      champion.max_seq_len))
        user_batches.append(torch.tensor(chunk))

    def reward_fn(users: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:        # (B,), (B, G) -> (B, G)
        raw = champion.item_ids[rows.clamp(min=0).numpy()]
        scores = reward_model.score(users.repeat_interleave(rows.shape[1]).numpy(), raw.reshape(-1))
        return torch.as_tensor(scores).view(rows.shape)

    progress(f"aligning ({cfg.align.method}, {cfg.align.steps} rounds x {cfg.align.batch_users} users "
             f"x {cfg.align.group_size} samples)")
    aligned, log = align(champion.model, contexts, user_batches, champion.trie, reward_fn, cfg.align, cfg.seed,
                         item_codes=champion.codes.table[1:])
    saved = save_model(aligned, Path(out_dir), tokenizer=tokenizer)
    aligned_served = ServedModel.from_dir(saved, "aligned", "challenger")

    check_users = sorted(set(int(u) for u in holdout["user_id"]) & set(by_user))
    histories = [by_user[u] for u in check_users]
    k, beam, head_k = cfg.serving.default_k, cfg.serving.beam_size, cfg.serving.head_candidates
    progress(f"offline check on {len(check_users)} users with held-out ratings")
    for name, served in (("champion", champion), ("aligned", aligned_served)):
        report.update({f"{name}_{key}": v for key, v in
                       offline_check(served, reward_model, check_users, histories, holdout, k, beam, head_k).items()})
    report.update(align_method=cfg.align.method, align_steps=cfg.align.steps,
                  sampled_reward_first=round(float(np.mean([r["mean_reward"] for r in log[:5]])), 4),
                  sampled_reward_last=round(float(np.mean([r["mean_reward"] for r in log[-5:]])), 4),
                  final_kl=round(log[-1]["kl"], 5), aligned_model=str(saved), reward_examples=len(examples))
    return report


# --------------------------------------------------------------------------- the align pipeline's steps

ALIGN_EXPERIMENT = "onerec-align"
REPORT = "alignment.json"


def align_step(cfg: Config, out_dir: str | Path, as_of: str = "") -> dict:
    """The registry's champion, aligned on the joined exposure rows served up to `as_of` ('' = all),
    tracked as an MLflow run (the aligned model under `model/`, the report as alignment.json)
    -> the report, with mlflow_run_id and champion_version."""
    import json
    import tempfile

    from mlflow.tracking import MlflowClient

    from onerec.registry import CHAMPION, Registry
    from onerec.retrain import tracking_uri

    uri = tracking_uri(cfg)
    reg = Registry.connect(uri, cfg.registry.model_name)
    champion = reg.alias_version(CHAMPION)
    if champion is None:
        raise ValueError(f"registered model '{reg.name}' has no champion to align: run the retrain pipeline first")
    with tempfile.TemporaryDirectory() as tmp:
        folder = reg.download(champion, Path(tmp) / "champion")
        report = {**align_saved_model(cfg, folder, out_dir, rewards="joined", as_of=as_of), "champion_version": champion}
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(ALIGN_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(ALIGN_EXPERIMENT)
    run_id = client.create_run(experiment_id, tags={"aligned_from": champion, "align_method": cfg.align.method,
                                                    "preset": cfg.preset}).info.run_id
    for key, value in report.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run_id, key.replace("@", "_at_"), float(value))
    client.log_artifacts(run_id, str(out_dir), "model")
    client.log_text(run_id, json.dumps(report, indent=2, sort_keys=True), REPORT)
    client.set_terminated(run_id)
    return {**report, "mlflow_run_id": run_id}


def register_challenger_step(cfg: Config, run_id: str, pipeline_run: str = "") -> str:
    """A new version from the align run, alias `challenger` -> it (the A/B test's treatment)."""
    import json
    import tempfile

    from mlflow.tracking import MlflowClient

    from onerec.registry import CHALLENGER, Registry
    from onerec.retrain import tracking_uri

    uri = tracking_uri(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        report = json.loads(Path(MlflowClient(uri).download_artifacts(run_id, REPORT, tmp)).read_text())
    k = cfg.serving.default_k
    tags = {"pipeline_run_id": pipeline_run, "aligned_from": str(report.get("champion_version", "")),
            "align_method": report["align_method"], "reward_source": report["reward_source"],
            **{key.replace("@", "_at_"): str(report[key]) for key in
               (f"champion_expected_reward@{k}", f"aligned_expected_reward@{k}", f"champion_liked_share@{k}",
                f"aligned_liked_share@{k}") if report.get(key) is not None}}
    reg = Registry.connect(uri, cfg.registry.model_name)
    version = reg.register(run_id, "model", tags=tags)
    reg.move({CHALLENGER: version}, action="register-alias", who="align-pipeline",
             reason=f"{report['align_method']} alignment of v{tags['aligned_from']}: expected reward@{k} "
                    f"{report.get(f'champion_expected_reward@{k}')} -> {report.get(f'aligned_expected_reward@{k}')}")
    return version
