"""The retrain pipeline's steps as plain functions: each KFP component in components/ is a thin
wrapper over one of them, so the whole flow runs and tests without a cluster.

    snap = snapshot_features(cfg, "snapshot/")                  # point-in-time, Feast offline store
    build_training_set(cfg, "snapshot/", "training_set/")       # leave-last-out over the snapshot
    fit_tokenizer_step(cfg, "training_set/", "tokenizer/")
    trained = train_step(cfg, "training_set/", "tokenizer/", "model/", tags)   # tracked in MLflow
    verdict = evaluate_step(cfg, "training_set/", "model/", trained["mlflow_run_id"])
    version = register_step(cfg, trained["mlflow_run_id"], pipeline_run="...")   # reads the verdict
    if verdict["beats_champion"]: set_challenger_step(cfg, version)

Data: the snapshot is every user's `user_sequence` features (the last features.sequence_length
items, oldest first) as of one instant, read through the `training` FeatureService with Feast's
point-in-time join; its identity is a hash of its content, logged with the run and the model
version. The training set is that snapshot's events split leave-last-out (the last item per user
tests, the one before validates), over the data set's item catalogue (side features come from
the catalogue, not the feature store). Simplification: a history longer than
features.sequence_length is cut to it, as the feature store keeps no more.

Evaluation compares the new model with the registry's champion on the same held-out items (the
champion re-scored on this snapshot's test set), by registry.select_metric; the new model "beats"
it when its metric > the champion's x (1 + registry.margin), or when there is no champion.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from onerec.config import Config
from onerec.endpoints import MLFLOW_TRACKING_URI, resolve_endpoints

SNAPSHOT_USERS, SNAPSHOT_ITEMS, SNAPSHOT_META = "users.parquet", "items.parquet", "snapshot.json"
TRAINING_EVENTS, TRAINING_META = "interactions.parquet", "training_set.json"
VERDICT = "evaluation.json"


def tracking_uri(cfg: Config) -> str:
    return resolve_endpoints(cfg.stack.state_dir).require(MLFLOW_TRACKING_URI)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {what} here; run the step that writes it first")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- 1. snapshot


def snapshot_features(cfg: Config, out_dir: str | Path, as_of: str | None = None) -> dict:
    """Every user's and item's features as of `as_of` (ISO time; default: the newest offline
    row) -> out_dir/{users,items}.parquet + snapshot.json (as_of, counts, content hash `id`)."""
    from onerec.features import store as feast_store
    from onerec.features.schema import EVENT_TS, TRAINING_SERVICE, VIEWS

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = feast_store.open_store(cfg)
    service = store.get_feature_service(TRAINING_SERVICE)
    offline = feast_store.feast_dir(cfg) / "offline"
    keys = {v.name: pd.read_parquet(offline / v.name, columns=[v.join_key, EVENT_TS]) for v in VIEWS}
    if any(keys[v.name].empty for v in VIEWS):
        raise ValueError(f"the offline store {offline} has no rows for "
                         f"{', '.join(v.name for v in VIEWS if keys[v.name].empty)}: run `onerec features "
                         "backfill` (and `onerec ingest`) first")
    when = max(pd.Timestamp(k[EVENT_TS].max()) for k in keys.values()) if as_of is None else _utc(as_of)
    frames = {}
    for entity, filename in (("user", SNAPSHOT_USERS), ("item", SNAPSHOT_ITEMS)):
        views = [v for v in VIEWS if v.entity == entity]
        key = views[0].join_key
        ids = np.sort(pd.concat([keys[v.name][key] for v in views]).unique())
        refs = [f"{p.name}:{f.name}" for p in service.feature_view_projections
                if p.name in {v.name for v in views} for f in p.features]
        df = store.get_historical_features(pd.DataFrame({key: ids, EVENT_TS: when}), features=refs).to_df()
        df = df.sort_values(key).reset_index(drop=True)
        df.to_parquet(out / filename, index=False)
        frames[entity] = df
    users = frames["user"]
    users = users[users["seq_item_ids"].map(lambda s: s is not None and len(s) > 0)]
    digest = hashlib.sha256()
    for uid, seq in zip(users["user_id"].to_numpy(), users["seq_item_ids"]):
        digest.update(np.int64(uid).tobytes() + np.asarray(seq, dtype=np.int64).tobytes())
    meta = {"id": digest.hexdigest()[:16], "as_of": when.isoformat(), "users": int(len(users)),
            "events": int(users["seq_item_ids"].map(len).sum()), "items": int(len(frames["item"])),
            "dataset": cfg.data.dataset}
    _write_json(out / SNAPSHOT_META, meta)
    return meta


def _utc(text: str) -> pd.Timestamp:
    """An ISO time; naive means UTC."""
    try:
        ts = pd.Timestamp(text)
    except ValueError:
        raise ValueError(f"--as-of '{text}' is not an ISO time, e.g. 1998-04-01T00:00:00Z") from None
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts


# --------------------------------------------------------------------------- 2. training set


def build_training_set(cfg: Config, snapshot_dir: str | Path, out_dir: str | Path) -> dict:
    """The snapshot's sequences -> out_dir/interactions.parquet (user_id, item_id, timestamp)
    + training_set.json (the snapshot id and the leave-last-out counts)."""
    from onerec.data import leave_last_out, load_dataset

    snap, out = Path(snapshot_dir), Path(out_dir)
    meta = _read_json(snap / SNAPSHOT_META, "feature snapshot")
    users = pd.read_parquet(snap / SNAPSHOT_USERS, columns=["user_id", "seq_item_ids", "seq_event_times_ms"])
    users = users[users["seq_item_ids"].map(lambda s: s is not None and len(s) > 0)]
    lengths = users["seq_item_ids"].map(len).to_numpy()
    events = pd.DataFrame({
        "user_id": np.repeat(users["user_id"].to_numpy(), lengths),
        "item_id": np.concatenate(users["seq_item_ids"].map(np.asarray).to_list()).astype(np.int64),
        "timestamp": np.concatenate(users["seq_event_times_ms"].map(np.asarray).to_list()).astype(np.int64) // 1000,
    })
    catalogue = load_dataset(cfg.data).items["item_id"].to_numpy()
    unknown = ~events["item_id"].isin(catalogue)
    events = events[~unknown].reset_index(drop=True)
    split = leave_last_out(events)
    out.mkdir(parents=True, exist_ok=True)
    events.to_parquet(out / TRAINING_EVENTS, index=False)
    info = {"snapshot_id": meta["id"], "as_of": meta["as_of"], "users": int(events["user_id"].nunique()),
            "events": int(len(events)), "dropped_unknown_items": int(unknown.sum()),
            "train": len(split.train), "valid": len(split.valid), "test": len(split.test)}
    if info["test"] == 0:
        raise ValueError(f"{snap}: no user has 3 or more events in the snapshot: nothing to validate or test on")
    _write_json(out / TRAINING_META, info)
    return info


def load_training_set(cfg: Config, training_dir: str | Path):
    """-> (OfflineData over the training set's events and the catalogue, training_set.json)."""
    from onerec.data import leave_last_out, load_dataset
    from onerec.data.loaders import Dataset
    from onerec.eval.baselines import ItemIndex, OfflineData, user_sequences

    training = Path(training_dir)
    info = _read_json(training / TRAINING_META, "training set")
    events = pd.read_parquet(training / TRAINING_EVENTS)
    catalogue = load_dataset(cfg.data)
    ds = Dataset(catalogue.name, events, catalogue.items, catalogue.users)
    split = leave_last_out(events)
    index = ItemIndex.from_items(ds.items)
    return OfflineData(ds, split, index, user_sequences(split, index)), info


# --------------------------------------------------------------------------- 3. tokenizer, 4. train


def fit_tokenizer_step(cfg: Config, training_dir: str | Path, out_dir: str | Path) -> dict:
    """Semantic IDs fitted on the training set's train events -> out_dir (safetensors + JSON)."""
    from onerec.model.data import fit_tokenizer

    data, _ = load_training_set(cfg, training_dir)
    tok = fit_tokenizer(data.split.train, data.dataset.items, cfg.tokenizer, cfg.seed)
    tok.save(out_dir)
    return {k: v for k, v in tok.report().items() if isinstance(v, (int, float, str))}


def train_step(cfg: Config, training_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path,
               tags: dict[str, str] | None = None, progress: bool = False) -> dict:
    """onerec.model.run_training on the training set with the fitted tokenizer, tracked in
    MLflow (run tags: the snapshot id and `tags`) -> its figures, with `mlflow_run_id`."""
    from onerec.model.train import run_training
    from onerec.tokenizer import SemanticIdTokenizer

    data, info = load_training_set(cfg, training_dir)
    run_tags = {"data_snapshot": info["snapshot_id"], "data_as_of": info["as_of"], **(tags or {})}
    return run_training(cfg, out_dir, progress=progress, tracking_uri=tracking_uri(cfg), data_set=data,
                        tokenizer=SemanticIdTokenizer.load(tokenizer_dir), run_tags=run_tags)


# --------------------------------------------------------------------------- 5. evaluate


def test_metrics(cfg: Config, model_dir: str | Path, data) -> dict:
    """Full-ranking test metrics of the saved model in model_dir on `data`'s test users. A model
    of another catalogue is scored through raw item ids: items it does not know are dropped from
    histories, and as targets count as misses (its metrics are scaled by the share it knows)."""
    from onerec.eval.baselines import EvalSet, ItemIndex
    from onerec.model.data import ItemCodes
    from onerec.model.train import evaluate_model, load_model

    model, tok = load_model(model_dir)
    if tok is None:
        raise ValueError(f"{model_dir}: the saved model has no tokenizer/")
    own, test = ItemIndex(np.asarray(tok.item_ids, dtype=np.int64)), data.seqs.for_test()
    codes = ItemCodes.from_tokenizer(tok, own)
    if np.array_equal(own.item_ids, data.index.item_ids):
        return evaluate_model(model, codes, test, cfg.train.beam_size, cfg.train.batch_size)

    def known(indices: np.ndarray) -> np.ndarray:
        raw = data.index.id_of(indices)
        return own.index_of(raw[np.isin(raw, own.item_ids)])

    hit = np.isin(data.index.id_of(test.targets), own.item_ids)                # (U,)
    sub = EvalSet(test.users[hit], [known(h) for h, k in zip(test.histories, hit) if k],
                  known(test.targets[hit]))
    metrics = evaluate_model(model, codes, sub, cfg.train.beam_size, cfg.train.batch_size)
    share = float(hit.mean())
    return {k: v * share if k.startswith(("recall", "ndcg")) else v for k, v in metrics.items()} | {
        "n_users": int(len(hit))}


def evaluate_step(cfg: Config, training_dir: str | Path, model_dir: str | Path, run_id: str | None = None) -> dict:
    """The new model against the champion on the training set's test users -> the verdict
    (also logged to run `run_id` as evaluation.json): both metric tables, beats_champion, why."""
    from onerec.registry import CHAMPION, Registry

    data, info = load_training_set(cfg, training_dir)
    metric, margin = cfg.registry.select_metric, cfg.registry.margin
    candidate = test_metrics(cfg, model_dir, data)
    reg = Registry.connect(tracking_uri(cfg), cfg.registry.model_name)
    champion_version = reg.alias_version(CHAMPION) if reg.exists() else None
    champion = None
    if champion_version is not None:
        with tempfile.TemporaryDirectory() as tmp:
            champion = test_metrics(cfg, reg.download(champion_version, tmp), data)
    if champion is None:
        beats, why = True, f"no {CHAMPION} yet"
    else:
        bar = champion[metric] * (1 + margin)
        beats = candidate[metric] > bar
        why = (f"{metric} {candidate[metric]:.4f} {'>' if beats else '<='} {CHAMPION} v{champion_version}'s "
               f"{champion[metric]:.4f} x (1 + {margin})")
    verdict = {"metric": metric, "margin": margin, "beats_champion": bool(beats), "reason": why,
               "candidate": _round(candidate), "champion": _round(champion) if champion else None,
               "champion_version": champion_version, "snapshot_id": info["snapshot_id"],
               "test_users": int(candidate["n_users"])}
    if run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri(cfg))
        client.log_dict(run_id, verdict, VERDICT)
        from onerec.model.train import metric_name

        for k, v in candidate.items():
            if k.startswith(("recall", "ndcg")):
                client.log_metric(run_id, metric_name(f"eval_{k}"), float(v))
    return verdict


def _round(metrics: dict) -> dict:
    return {k: round(float(v), 5) for k, v in metrics.items() if isinstance(v, (int, float))}


# --------------------------------------------------------------------------- 6. register


def register_step(cfg: Config, run_id: str, pipeline_run: str = "") -> str:
    """A new version of the registered model from run `run_id`'s `model` artifacts, tagged with
    the pipeline run, the data snapshot and the run's evaluation (evaluate_step) -> its number."""
    from mlflow.tracking import MlflowClient

    from onerec.model.train import metric_name
    from onerec.registry import Registry

    uri = tracking_uri(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        verdict = _read_json(Path(MlflowClient(uri).download_artifacts(run_id, VERDICT, tmp)), "evaluation")
    tags = {"pipeline_run_id": pipeline_run, "data_snapshot": verdict["snapshot_id"],
            "beats_champion": str(verdict["beats_champion"]).lower(), "evaluation": verdict["reason"],
            **{metric_name(f"test_{k}"): str(v) for k, v in verdict["candidate"].items()
               if k.startswith(("recall", "ndcg"))}}
    return Registry.connect(uri, cfg.registry.model_name).register(run_id, "model", tags=tags)


def set_challenger_step(cfg: Config, version: str) -> dict[str, str]:
    """Alias `challenger` -> version; with no champion yet it becomes the champion too (so the
    predictor has something to serve). Recorded in the audit trail as the pipeline's doing, with
    the version's evaluation as the reason."""
    from onerec.registry import CHALLENGER, CHAMPION, Registry

    reg = Registry.connect(tracking_uri(cfg), cfg.registry.model_name)
    changes: dict[str, str | None] = {CHALLENGER: str(version)}
    if reg.alias_version(CHAMPION) is None:
        changes[CHAMPION] = str(version)
    reg.move(changes, action="register-alias", reason=reg.version(version).tags.get("evaluation", ""),
             who="retrain-pipeline")
    return reg.aliases()
