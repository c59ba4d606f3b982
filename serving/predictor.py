"""The KServe predictor: a kserve.Model over onerec.serve (all logic lives there).

KServe v1 (`POST /v1/models/<name>:predict`):
    {"instances": [{"user_id": 42, "k": 10, "request_id": "r-1"}, ...]}   (+ "log_exposure": false
    for a synthetic probe: answered, but neither logged as an exposure nor counted in an A/B test)
 -> {"predictions": [{"request_id", "user_id", "items", "scores", "semantic_ids", "variant",
                      "model_version", "fallback"}, ...]}
Open Inference Protocol v2 (`POST /v2/models/<name>/infer`): inputs `user_id` INT64 [B] and
optionally `k` INT64 [B]; outputs `item_ids` INT64 [B, K] and `scores` FP32 [B, K] (rows shorter
than K padded with -1 / 0), `model_version`, `variant`, `fallback` BYTES [B] ("" = none).
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping

import kserve
import numpy as np
from fastapi.responses import JSONResponse
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput, ServerNotReady
from prometheus_client import Counter, Histogram

from onerec.batching import MicroBatcher, Overloaded
from onerec.config import Config
from onerec.exposures import ExposureLog
from onerec.model_process import ModelProcess, model_cpus
from onerec.serve import ABRouter, FeatureSource, Recommender, RequestError, ServedModel, parse_request


REQUEST_SECONDS = Histogram("onerec_serving_request_seconds", "predict() per HTTP request",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
BAD_REQUESTS = Counter("onerec_serving_bad_requests", "requests refused with 400")
OVERLOADED = Counter("onerec_serving_overloaded", "requests refused with 503: too many waiting, or shed")
FAILURES = Counter("onerec_serving_failures", "requests that failed in the model or the feature lookup (500)")
RELOADS = Counter("onerec_serving_reloads", "model swaps after an alias moved, by outcome", ["outcome"])
RETIRED_GRACE_S = 30.0     # a swapped-out model is freed this long after the swap (no batch runs that long)
RETRY_AFTER_S = 1          # the Retry-After header of a 503
log = logging.getLogger(__name__)


class Shed(ServerNotReady):
    """A request refused under overload (503). Refusals are expected under load and counted in
    onerec_serving_overloaded, so `shed_handler` answers them without KServe's handler for
    ServerNotReady, which logs an error with a formatted traceback for each one: under overload
    that formatting took ~2 % of the event loop, on the requests it was refusing to save time."""


async def shed_handler(_request, exc: Shed) -> JSONResponse:
    """Install on the server's app: app.add_exception_handler(Shed, shed_handler)."""
    return JSONResponse(status_code=503, content={"error": str(exc)}, headers={"Retry-After": str(RETRY_AFTER_S)})


class OneRecPredictor(kserve.Model):
    """model_dirs {alias: (directory, version)} serves local folders instead of the registry
    (tests, air-gapped hosts); features replaces the Feast online store (tests); exposures is
    where every response is logged (None: not logged)."""

    def __init__(self, name: str, cfg: Config, tracking_uri: str | None = None, device: str = "cpu",
                 model_dirs: Mapping[str, tuple[str, str]] | None = None, features: FeatureSource | None = None,
                 exposures: ExposureLog | None = None):
        super().__init__(name)
        self.cfg, self.tracking_uri, self.device = cfg, tracking_uri, device
        self.model_dirs, self.features, self.exposures = model_dirs, features, exposures
        self.router = ABRouter(cfg.serving.ab_config or None)
        self.recommender: Recommender | None = None
        self.batcher: MicroBatcher | None = None
        self.worker: ModelProcess | None = None       # runs the beam search when serving.model_process
        self._retired: list[tuple[float, ServedModel]] = []   # swapped out; released after a grace period
        self._watcher: threading.Thread | None = None
        self._reg = None                              # the registry client, made on first use
        self._stop = threading.Event()
        self._tmp = tempfile.TemporaryDirectory(prefix="onerec-serving-")

    def load(self) -> bool:
        """Fetch every alias the A/B config uses (champion always) and open the feature store."""
        if self.cfg.serving.model_process and self.worker is None:
            s = self.cfg.serving
            self.worker = ModelProcess(self.device, s.model_threads,
                                       cpus=model_cpus(s.model_threads) if s.pin_cpus else set())
        models = self._fetch(self.router.aliases() | {"champion"})
        features = self.features
        if features is None:
            from onerec.features.store import open_store
            from onerec.serve import FeastFeatures

            features = FeastFeatures(open_store(self.cfg), models["champion"].item_ids,
                                     self.cfg.serving.popular_refresh_s)
        self.recommender = Recommender(models, features, self.router, self.cfg.serving)
        if self.batcher is None:
            s = self.cfg.serving
            r = self.recommender
            self.batcher = MicroBatcher(r.complete if s.pipeline else r.recommend, s.max_batch_size, s.max_batch_wait_ms / 1000,
                                        s.max_pending, name="recommend-batcher", max_queue_s=s.max_queue_ms / 1000,
                                        standing_s=s.standing_queue_ms / 1000,
                                        prepare=r.plan if s.pipeline else None)
        if self.model_dirs is None and self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="alias-watcher", daemon=True)
            self._watcher.start()
        self.ready = True
        return self.ready

    def reload_if_moved(self) -> bool:
        """Hot reload: when an alias this predictor serves points at another version (a promote,
        a rollback, a new challenger), fetch it and swap the models in one assignment; requests
        in flight finish on the models they started with. -> True when it swapped."""
        wanted = self.router.aliases() | {"champion"}
        current = {a: v for a, v in self._registry().aliases().items() if a in wanted}
        served = {a: m.version for a, m in self.recommender.models.items()}
        if current == served or "champion" not in current:
            return False
        keep = {a: m for a, m in self.recommender.models.items() if current.get(a) == m.version}
        fresh = self._fetch(set(current) - set(keep))
        retiring = [m for a, m in self.recommender.models.items() if a not in keep]
        self.recommender.swap({**keep, **fresh})
        # a batch that began before the swap may still run on a retired model: free it later
        self._retired += [(time.monotonic(), m) for m in retiring]
        for alias, old in served.items():                 # old versions' downloads are no longer read
            if current.get(alias) != old:
                shutil.rmtree(f"{self._tmp.name}/{alias}-v{old}", ignore_errors=True)
        log.info("swapped models: %s -> %s", served, current)
        return True

    def release_retired(self, grace_s: float = RETIRED_GRACE_S) -> None:
        """Free the models swapped out more than grace_s ago (in the model process: its memory)."""
        now = time.monotonic()
        due = [m for at, m in self._retired if now - at >= grace_s]
        self._retired = [(at, m) for at, m in self._retired if now - at < grace_s]
        for model in due:
            model.release()

    def poll(self) -> None:
        """One round of the alias watcher: free the retired models, swap in moved aliases. A
        failure keeps the models being served, and the next round reconnects (connecting checks
        MLflow's /health, which fails fast while it is down)."""
        try:
            self.release_retired()
            if self.reload_if_moved():
                RELOADS.labels("swapped").inc()
        except Exception as exc:  # noqa: BLE001 - keep serving the models we have
            self._reg = None
            RELOADS.labels("failed").inc()
            log.warning("hot reload failed (still serving %s): %s",
                        {a: m.version for a, m in self.recommender.models.items()}, exc)

    def _watch(self) -> None:
        while not self._stop.wait(self.cfg.serving.reload_poll_s):
            self.poll()

    def stop(self):
        self._stop.set()
        if self.batcher is not None:
            self.batcher.close()
        if self.exposures is not None:
            self.exposures.close()
        if self.worker is not None:
            self.worker.close()
        super().stop()

    def _registry(self):
        """One client for every poll: connecting checks MLflow's /health first, and each request
        costs the MLflow server CPU (~6 ms for /health, ~40 ms for the aliases, measured), which a
        co-located server takes from the beam search."""
        from onerec.registry import Registry

        if self._reg is None:
            self._reg = Registry.connect(self.tracking_uri, self.cfg.registry.model_name)
        return self._reg

    def _fetch(self, aliases: set[str]) -> dict[str, ServedModel]:
        if self.model_dirs is not None:
            return {a: ServedModel.from_dir(d, v, a, self.device, self.worker)
                    for a, (d, v) in self.model_dirs.items() if a in aliases}
        reg = self._registry()
        current = reg.aliases()
        if "champion" not in current:
            raise RuntimeError(f"registered model '{reg.name}' has no champion to serve: run the retrain "
                               "pipeline or `onerec model promote VERSION`")
        models = {}
        for alias in sorted(aliases & set(current)):
            folder = reg.download(current[alias], f"{self._tmp.name}/{alias}-v{current[alias]}")
            models[alias] = ServedModel.from_dir(folder, current[alias], alias, self.device, self.worker)
        return models

    async def predict(self, payload, headers=None, response_headers=None):
        """Concurrent calls are batched (MicroBatcher): the beam search runs on the batcher's thread
        while the event loop accepts more requests."""
        with REQUEST_SECONDS.time():
            self.router.refresh_every()                   # an edited A/B file applies within a second
            if isinstance(payload, InferRequest):
                return self._v2_response(payload, await self._recommend(self._v2_rows(payload)))
            if not isinstance(payload, Mapping) or not isinstance(payload.get("instances"), list) \
                    or not payload["instances"]:
                BAD_REQUESTS.inc()
                raise InvalidInput('the body must be {"instances": [{"user_id": ...}, ...]} with at least one instance')
            return {"predictions": [r.as_dict() for r in await self._recommend(payload["instances"])]}

    async def _recommend(self, rows) -> list:
        start = time.perf_counter()
        try:
            requests = [parse_request(row, self.cfg.serving) for row in rows]
        except RequestError as exc:
            BAD_REQUESTS.inc()
            raise InvalidInput(str(exc)) from None
        try:
            recs = await asyncio.wrap_future(self.batcher.submit(requests))
        except Overloaded as exc:                         # too many waiting, or waited too long
            OVERLOADED.inc()
            raise Shed(str(exc)) from None                # 503: the client retries (with backoff)
        except Exception:
            FAILURES.inc()                                # the guardrails' error rate counts these
            raise
        if self.exposures is not None:
            self.exposures.publish([rec for rec, req in zip(recs, requests) if req.log_exposure],
                                   latency_ms=round((time.perf_counter() - start) * 1000, 3))
        return recs

    @staticmethod
    def _v2_rows(request: InferRequest) -> list[dict]:
        inputs = {i.name: i for i in request.inputs}
        if "user_id" not in inputs or set(inputs) - {"user_id", "k"}:
            raise InvalidInput(f"inputs must be `user_id` INT64 [B] and optionally `k` INT64 [B]; got {sorted(inputs)}")
        users = np.asarray(inputs["user_id"].as_numpy()).reshape(-1)
        ks = np.asarray(inputs["k"].as_numpy()).reshape(-1) if "k" in inputs else None
        if ks is not None and len(ks) != len(users):
            raise InvalidInput(f"`k` has {len(ks)} values for {len(users)} users")
        return [{"user_id": int(u), **({} if ks is None else {"k": int(ks[i])})} for i, u in enumerate(users)]

    def _v2_response(self, request: InferRequest, recs: list) -> InferResponse:
        width = max(len(r.items) for r in recs)
        items = np.full((len(recs), width), -1, dtype=np.int64)
        scores = np.zeros((len(recs), width), dtype=np.float32)
        for i, r in enumerate(recs):
            items[i, :len(r.items)], scores[i, :len(r.scores)] = r.items, r.scores
        outputs = [InferOutput("item_ids", list(items.shape), "INT64", items),
                   InferOutput("scores", list(scores.shape), "FP32", scores)]
        outputs += [InferOutput(name, [len(recs)], "BYTES", [getattr(r, name) or "" for r in recs])
                    for name in ("model_version", "variant", "fallback")]
        return InferResponse(request.id or recs[0].request_id, self.name, outputs)
