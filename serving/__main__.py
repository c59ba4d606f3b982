"""`python -m serving`: KServe's model server with the OneRec predictor.

    python -m serving --model_name onerec --preset full [--set KEY=VALUE] [--device cuda]
Every KServe option works (--http_port, --workers, ...); ours are added to KServe's parser.
(`--preset`, not `--config`: KServe parses sys.argv when imported, and `--config` would
abbreviate its `--configure_logging`.)
MLflow, Feast and Kafka endpoints come from the environment (MLFLOW_TRACKING_URI, REDIS_URL,
KAFKA_BOOTSTRAP: without it, exposures are not logged).
Per-request log lines (uvicorn's access log, KServe's latency trace) are off unless
--request_log: under load they took ~15 % of the event loop's time, and every response is
already in the exposure log and the Prometheus histograms. So is the timing middleware that feeds
the latency trace, and the event loop is uvloop's (as KServe's --event-loop auto promises; its
asyncio.run never applied it)."""
import argparse
import asyncio
import logging
import os
import sys

import kserve
from kserve import model_server
from kserve.protocol.rest.server import RESTServer

from onerec.config import load_config
from onerec.endpoints import MLFLOW_TRACKING_URI, resolve_endpoints
from onerec.exposures import ExposureLog
from onerec.model_process import pin_threads
from onerec.serve import settle_heap
from serving.predictor import OneRecPredictor, Shed, shed_handler

parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__.split("\n")[0])
parser.add_argument("--preset", default="full", help="preset name or YAML path [%(default)s]")
parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
parser.add_argument("--mlflow_tracking_uri", help="default: MLFLOW_TRACKING_URI")
parser.add_argument("--registered_model", help="default: registry.model_name")
parser.add_argument("--ab_config", help="A/B file (YAML/JSON); default: serving.ab_config")
parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
parser.add_argument("--request_log", action="store_true", help="log a line per request (access + latency)")


class UntimedRESTServer(RESTServer):
    """KServe's REST server without timing_asgi's TimingMiddleware, which KServe adds to every app:
    it calls getrusage twice a request to log a timing line to `kserve.trace`, a logger that is
    silent without --request_log. Under load that was ~28 % of the event loop's time per request
    (py-spy). An --access_log_format keeps KServe's middlewares, timing included."""

    def _add_middlewares(self, app) -> None:
        if self.access_log_format:
            super()._add_middlewares(app)


def use_uvloop(event_loop: str) -> bool:
    """KServe's --event-loop: 'auto' (uvloop when installed) or 'uvloop' -> the uvloop policy, so
    the asyncio.run in ModelServer.start runs on it. -> whether it did."""
    if event_loop == "asyncio":
        return False
    try:
        import uvloop
    except ImportError:
        if event_loop == "uvloop":
            raise
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())      # ModelServer asks for the current loop first
    return True


if __name__ == "__main__":
    args = parser.parse_args()
    overrides = [*args.overrides, *([f"registry.model_name={args.registered_model}"] if args.registered_model else []),
                 *([f"serving.ab_config={args.ab_config}"] if args.ab_config else [])]
    cfg = load_config(args.preset, overrides)
    uri = args.mlflow_tracking_uri or resolve_endpoints(cfg.stack.state_dir).require(MLFLOW_TRACKING_URI)
    bootstrap = resolve_endpoints(cfg.stack.state_dir).kafka_bootstrap
    exposures = ExposureLog(bootstrap, cfg.kafka.exposures.name) if bootstrap else None
    predictor = OneRecPredictor(args.model_name, cfg, tracking_uri=uri, device=args.device, exposures=exposures)
    predictor.load()
    if predictor.worker is not None and predictor.worker.cpus:     # serving.pin_cpus: the model process has its own
        pin_threads(set(os.sched_getaffinity(0)) - predictor.worker.cpus)
    server = kserve.ModelServer(enable_latency_logging=args.request_log)     # configures the loggers
    if not args.request_log:
        for name in ("uvicorn.access", "kserve.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)
        model_server.RESTServer = UntimedRESTServer    # the class ModelServer.start builds its server from
    use_uvloop(args.event_loop)
    model_server.app.add_exception_handler(Shed, shed_handler)        # 503s without a traceback each
    sys.setswitchinterval(cfg.serving.gil_switch_ms / 1000)     # the runner thread waits less for the GIL
    settle_heap()                     # before traffic: no full-GC pause over what start-up built
    server.start([predictor])
