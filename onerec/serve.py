"""Online recommendation: what the KServe predictor (serving/) does per request, without KServe.

    req = parse_request(payload, cfg.serving)        # validated at the boundary (RequestError = 400)
    router = ABRouter.from_file(path)                # deterministic variant per (salt, user)
    served = ServedModel.from_dir(model_dir, version="3", alias="champion")
    served = ServedModel.from_dir(model_dir, "3", "champion", worker=ModelProcess())  # the model in a child
    rec = Recommender({"champion": served}, features, router, cfg.serving)
    rec.recommend([req, ...])                        # one batched beam search per variant

A request names a user (and optionally k and a request id). The user's history is the
`user_sequence` feature (raw item ids, oldest first) from the online store; trie-constrained
beam search (onerec.model.topk_next_items) over the variant's model gives k catalogue items,
their scores and semantic IDs. Cold users (no history, or none of it in the model's catalogue)
and a feature store that fails get the popular items instead, flagged `fallback` with the
reason: a request never fails for those.

A/B file (YAML or JSON), reread when its modification time changes:
    experiment: onerec-v2-vs-v3    # also the hashing salt: a new experiment reshuffles users
    variants:
      - {name: control, alias: champion, weight: 90}
      - {name: treatment, alias: challenger, weight: 10}
"""
from __future__ import annotations

import gc
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from prometheus_client import Counter, Histogram

from onerec.config import ServingConfig
from onerec.model_process import ModelProcess

CHAMPION_ONLY = "control"
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FEATURE_SECONDS = Histogram("onerec_serving_feature_seconds", "feature lookup per batch", buckets=_BUCKETS)
GENERATION_SECONDS = Histogram("onerec_serving_generation_seconds", "beam search per batch and variant",
                               buckets=_BUCKETS)
RECOMMENDATIONS = Counter("onerec_serving_recommendations", "recommendations served", ["variant"])
FALLBACKS = Counter("onerec_serving_fallbacks", "recommendations that fell back", ["reason"])


class RequestError(ValueError):
    """A malformed request: the message says what is wrong (HTTP 400)."""


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True)
class RecRequest:
    user_id: int
    k: int
    request_id: str
    log_exposure: bool = True     # False: a synthetic probe (health check, drill); no exposure, no A/B count


FIELDS = ("user_id", "k", "request_id", "log_exposure")


def parse_request(payload: object, cfg: ServingConfig) -> RecRequest:
    """{"user_id": int, "k": int, "request_id": str, "log_exposure": bool} (all but user_id
    optional) -> RecRequest."""
    if not isinstance(payload, Mapping):
        raise RequestError(f"a request must be an object like {{\"user_id\": 42}}, got {type(payload).__name__}")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    user = payload.get("user_id")
    if isinstance(user, bool) or not isinstance(user, int) or user < 0:
        raise RequestError(f"user_id must be a non-negative integer, got {user!r}")
    k = payload.get("k", cfg.default_k)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cfg.max_k:
        raise RequestError(f"k must be an integer in 1..{cfg.max_k}, got {k!r}")
    request_id = payload.get("request_id") or uuid.uuid4().hex
    if not isinstance(request_id, str) or len(request_id) > 128:
        raise RequestError("request_id must be a string of at most 128 characters")
    log_exposure = payload.get("log_exposure", True)
    if not isinstance(log_exposure, bool):
        raise RequestError(f"log_exposure must be true or false, got {log_exposure!r}")
    return RecRequest(user, k, request_id, log_exposure)


# --------------------------------------------------------------------------- A/B routing


@dataclass(frozen=True)
class Variant:
    name: str
    alias: str        # the registry alias whose model serves this variant
    weight: float


@dataclass(frozen=True)
class ABConfig:
    experiment: str
    variants: tuple[Variant, ...]

    @classmethod
    def champion_only(cls) -> ABConfig:
        return cls("", (Variant(CHAMPION_ONLY, "champion", 1.0),))

    @classmethod
    def parse(cls, data: object, where: str) -> ABConfig:
        if not isinstance(data, Mapping) or not isinstance(data.get("experiment"), str) or not data["experiment"]:
            raise ValueError(f"{where}: needs `experiment` (a non-empty string) and `variants`")
        rows = data.get("variants")
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{where}: `variants` must be a non-empty list of {{name, alias, weight}}")
        variants = []
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping) or set(row) != {"name", "alias", "weight"}:
                raise ValueError(f"{where}: variants[{i}] must have exactly name, alias, weight")
            w = row["weight"]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"{where}: variants[{i}].weight must be a number >= 0")
            variants.append(Variant(str(row["name"]), str(row["alias"]), float(w)))
        if len({v.name for v in variants}) != len(variants) or sum(v.weight for v in variants) <= 0:
            raise ValueError(f"{where}: variant names must be unique and the weights must sum to > 0")
        return cls(data["experiment"], tuple(variants))

    def assign(self, user_id: int) -> Variant:
        """The same (experiment, user) always lands in the same variant; shares follow the weights."""
        if len(self.variants) == 1:
            return self.variants[0]
        digest = hashlib.sha256(f"{self.experiment}:{user_id}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64 * sum(v.weight for v in self.variants)
        for v in self.variants:
            point -= v.weight
            if point < 0:
                return v
        return self.variants[-1]


class ABRouter:
    """The A/B config of a file, reread whenever the file changes (a bad edit keeps the last good
    config and is reported by `error`); without a file, everyone gets the champion."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.config, self.error, self._mtime = ABConfig.champion_only(), None, None
        self._lock = threading.Lock()
        if self.path is not None:
            self.refresh(strict=True)

    def refresh(self, strict: bool = False) -> bool:
        """Reload if the file changed -> True when a new config took effect."""
        if self.path is None:
            return False
        try:
            mtime = self.path.stat().st_mtime_ns
            if mtime == self._mtime:
                return False
            text = self.path.read_text()
            config = ABConfig.parse(yaml.safe_load(text) if self.path.suffix in (".yaml", ".yml")
                                    else json.loads(text), str(self.path))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            if strict:
                raise ValueError(f"A/B config: {exc}") from None
            self.error = str(exc)
            return False
        with self._lock:
            self.config, self._mtime, self.error = config, mtime, None
        return True

    def assign(self, user_id: int) -> Variant:
        return self.config.assign(user_id)

    def refresh_every(self, interval_s: float = 1.0) -> None:
        """`refresh` at most once per interval_s (the predictor calls this per request)."""
        now = time.monotonic()
        if now - getattr(self, "_checked", -interval_s) >= interval_s:
            self._checked = now
            self.refresh()

    def aliases(self) -> set[str]:
        return {v.alias for v in self.config.variants}


FULL_GC_EVERY = 100        # generation-1 collections between full ones (CPython's default: 10)


def settle_heap(collect: bool = True) -> None:
    """Move every object alive now out of the cyclic GC's reach (gc.freeze), after a load.

    Why: a serving process holds ~1M long-lived objects (torch, Feast, MLflow, KServe), and
    every full (gen-2) collection walked them all: 100-175 ms with the GIL held, every 4-10 s
    under load, which stalled the event loop, stood the queue up and shed requests while the
    p99 was 20-40 ms (RESULTS.md). Frozen objects are still freed by reference counting; only
    cycles among them are never collected, so collect first where a pause is affordable
    (at start-up, not while batches run).

    Full collections of what is left still took ~10 ms about once a second under load, so they
    also come 10x less often (after 100 younger collections, not 10): at 32 clients that was
    957-996 QPS and p99 43-53 ms against 905-949 QPS and 52-55 ms, servers alternating."""
    if collect:
        gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_GC_EVERY)


# --------------------------------------------------------------------------- models


@dataclass(eq=False)              # a handle: equal only to itself
class ServedModel:
    """A loaded registry version: its catalogue and the model, ready for beam search. The model
    runs here (model, trie set) or in a ModelProcess (worker set, model and trie None), keyed
    by the version's directory."""
    model: object | None
    item_ids: np.ndarray          # (N,) raw ids; item index i + 1 <-> item_ids[i]
    codes: object                 # ItemCodes
    trie: object | None           # CodeTrie on the model's device
    version: str
    alias: str
    worker: ModelProcess | None = None
    directory: str = ""

    @property
    def max_seq_len(self) -> int:
        return self.model.cfg.max_seq_len

    @classmethod
    def from_dir(cls, directory: str | Path, version: str, alias: str, device: str = "cpu",
                 worker: ModelProcess | None = None) -> ServedModel:
        from onerec.eval.baselines import ItemIndex
        from onerec.model.data import ItemCodes
        from onerec.model.train import load_model, load_tokenizer

        if worker is None:
            model, tok = load_model(directory, device)
        else:                                   # the catalogue here, the model there
            model, tok = None, load_tokenizer(directory)
        if tok is None:
            raise ValueError(f"{directory}: no tokenizer/ beside the weights: not a servable model")
        index = ItemIndex(np.asarray(tok.item_ids, dtype=np.int64))
        codes = ItemCodes.from_tokenizer(tok, index)
        if worker is not None:
            worker.load(str(directory))          # checks the weights against the tokenizer, warms up
            return cls(None, index.item_ids, codes, None, str(version), alias, worker, str(directory))
        served = cls(model, index.item_ids, codes, codes.trie().to(device), str(version), alias)
        served.top_items([np.array([1])], 1, 1)           # warm up (first-call allocations) before traffic
        return served

    def release(self) -> None:
        """Free the model in the worker (a no-op for a model that runs here)."""
        if self.worker is not None:
            self.worker.unload(self.directory)

    def histories(self, sequences: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Raw item ids -> this model's item indices; items it does not know are left out."""
        out = []
        for seq in sequences:
            raw = np.asarray(seq, dtype=np.int64)
            pos = np.searchsorted(self.item_ids, raw)
            ok = (pos < len(self.item_ids)) & (self.item_ids[np.minimum(pos, len(self.item_ids) - 1)] == raw)
            out.append(pos[ok] + 1)
        return out

    @torch.inference_mode()       # not only no_grad: no version counters or view tracking either (1.04-1.14x)
    def top_items(self, histories: list[np.ndarray], k: int, beam_size: int,
                  head_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> raw item ids (B, k) and scores (B, k), best first: beam_size beams (and the hybrid's
        head_k head items, default beam_size), widened to k where they could not supply k items."""
        if self.worker is not None:
            return self.worker.top_items(self.directory, histories, k, beam_size, head_k)
        from onerec.model.beam import is_hybrid, topk_next_items
        from onerec.model.data import context_batch

        head_k = beam_size if head_k is None else head_k
        if is_hybrid(self.model):
            head_k = max(k, head_k)             # the head's top k are k distinct items
        else:
            beam_size = max(k, beam_size)       # the k beams are k distinct items
        device = next(self.model.parameters()).device
        ctx = context_batch(histories, self.codes, self.max_seq_len, device)
        rows, scores = topk_next_items(self.model, ctx, self.trie.allowed, self.trie.item_of, beam_size, k, head_k)
        return self.item_ids[rows.cpu().numpy()], scores.float().cpu().numpy()

    def semantic_ids(self, item_ids: np.ndarray) -> list[list[int]]:
        return self.codes.table[self.histories([item_ids])[0]].tolist()


# --------------------------------------------------------------------------- features


class FeatureSource:
    """What the recommender reads: users' histories and the popular items."""

    def histories(self, user_ids: Sequence[int]) -> list[list[int]]:
        raise NotImplementedError

    def popular(self, n: int) -> list[int]:
        raise NotImplementedError


class FeastFeatures(FeatureSource):
    """The `recommender_online` FeatureService (user histories) and `item_stats` (popularity,
    over the catalogue, reread every `refresh_s`)."""

    def __init__(self, store, catalogue: Sequence[int], refresh_s: float):
        from onerec.features.schema import ONLINE_SERVICE

        self.store, self.catalogue, self.refresh_s = store, [int(i) for i in catalogue], refresh_s
        self.service = store.get_feature_service(ONLINE_SERVICE)
        self._popular: list[int] = []
        self._popular_at = -float("inf")

    def histories(self, user_ids: Sequence[int]) -> list[list[int]]:
        rows = self.store.get_online_features(features=self.service,
                                              entity_rows=[{"user_id": int(u)} for u in user_ids]).to_dict()
        return [list(s or []) for s in rows["seq_item_ids"]]

    def popular(self, n: int) -> list[int]:
        """Raises when the store fails and no earlier list is cached (else the cached list)."""
        if time.monotonic() - self._popular_at > self.refresh_s:
            try:
                self._refresh_popular()
            except Exception:  # noqa: BLE001 - a stale list beats none
                if not self._popular:
                    raise
        return self._popular[:n]

    def _refresh_popular(self) -> None:
        rows = self.store.get_online_features(features=["item_stats:popularity_window", "item_stats:interactions"],
                                              entity_rows=[{"item_id": i} for i in self.catalogue]).to_dict()
        score = np.nan_to_num(np.array([rows["popularity_window"], rows["interactions"]], dtype=float))
        order = np.lexsort((-score[1], -score[0]))                    # by recent, then all-time popularity
        self._popular, self._popular_at = [self.catalogue[i] for i in order], time.monotonic()


# --------------------------------------------------------------------------- the recommender


@dataclass
class Recommendation:
    request_id: str
    user_id: int
    items: list[int]
    scores: list[float]
    semantic_ids: list[list[int]]
    variant: str
    model_version: str
    fallback: str | None          # None, or why: cold_user | features_unavailable
    experiment: str = ""          # the A/B experiment it was served under ('' = none)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class BatchPlan:
    """Recommender.plan's output: the requests, the experiment, why a cold request falls back,
    and per variant (its name, its ServedModel, its rows in requests, their known histories)."""
    requests: list[RecRequest]
    experiment: str
    fallback: str
    groups: list[tuple[str, ServedModel, list[int], list[np.ndarray]]]


class Recommender:
    def __init__(self, models: Mapping[str, ServedModel], features: FeatureSource, router: ABRouter,
                 cfg: ServingConfig):
        self.models, self.features, self.router, self.cfg = dict(models), features, router, cfg
        self.feature_errors = 0

    def swap(self, models: Mapping[str, ServedModel]) -> None:
        """New models for new requests; a request in flight keeps the dict it started with."""
        self.models = dict(models)

    def recommend(self, requests: Sequence[RecRequest]) -> list[Recommendation]:
        return self.complete(self.plan(requests))

    def plan(self, requests: Sequence[RecRequest]) -> BatchPlan:
        """A batch up to its beam searches: the feature lookup, each request's variant and its
        history in that model's items. MicroBatcher runs it for batch k+1 while `complete` runs
        the beam search of batch k."""
        models, ab = self.models, self.router.config                  # one snapshot per batch
        try:
            with FEATURE_SECONDS.time():
                histories = self.features.histories([r.user_id for r in requests])
            reason = "cold_user"
        except Exception:  # noqa: BLE001 - the online store down must not fail a request
            self.feature_errors += 1
            histories, reason = [[] for _ in requests], "features_unavailable"
        rows_by: dict[tuple[str, str], list[int]] = {}
        for i, req in enumerate(requests):
            variant = ab.assign(req.user_id)
            alias = variant.alias if variant.alias in models else "champion"
            rows_by.setdefault((variant.name, alias), []).append(i)
        groups = [(variant, models[alias], rows, models[alias].histories([histories[i] for i in rows]))
                  for (variant, alias), rows in rows_by.items()]
        return BatchPlan(list(requests), ab.experiment, reason, groups)

    def complete(self, plan: BatchPlan) -> list[Recommendation]:
        """The beam search per variant (fallbacks for the requests without a known history)."""
        requests = plan.requests
        out: list[Recommendation | None] = [None] * len(requests)
        for variant, served, rows, known in plan.groups:
            warm = [j for j, h in enumerate(known) if len(h)]
            if warm:
                k = max(requests[rows[j]].k for j in warm)
                with GENERATION_SECONDS.time():
                    items, scores = served.top_items([known[j] for j in warm], k, self.cfg.beam_size,
                                                     self.cfg.head_candidates)
                for j, row_items, row_scores in zip(warm, items, scores):
                    req = requests[rows[j]]
                    top = row_items[:req.k]
                    out[rows[j]] = Recommendation(req.request_id, req.user_id, top.tolist(),
                                                  [float(s) for s in row_scores[:req.k]], served.semantic_ids(top),
                                                  variant, served.version, None, plan.experiment)
            for j in set(range(len(rows))) - set(warm):
                req = requests[rows[j]]
                try:
                    items = self.features.popular(req.k)
                except Exception:  # noqa: BLE001 - last resort: the catalogue's first items
                    self.feature_errors += 1
                    items = []
                items = items or [int(i) for i in served.item_ids[:req.k]]
                out[rows[j]] = Recommendation(req.request_id, req.user_id, items, [0.0] * len(items),
                                              served.semantic_ids(np.asarray(items)), variant, served.version,
                                              plan.fallback, plan.experiment)
        for rec in out:
            RECOMMENDATIONS.labels(rec.variant).inc()
            if rec.fallback:
                FALLBACKS.labels(rec.fallback).inc()
        return out  # type: ignore[return-value]
