"""The A/B dashboard: `onerec dashboard` (FastAPI, server-rendered HTML, plotly.js inlined so it
works offline), and a JSON API with the same numbers.

    app = create_app(Dashboard(cfg, store, registry=reg, mlflow_url=uri, metrics_url=url))
    GET /                              experiments, newest first
    GET /experiments/{name}            health banner, scorecard, lift CI bars, cumulative lift,
                                       the primary metric over time, decision hint (auto-refresh)
    GET /api/experiments               [{name, first_ms, last_ms, exposures, users, variants}]
    GET /api/experiments/{name}        the scorecard (onerec/abtest/scorecard.py) + model links
    POST /api/model/{promote|rollback} the registry's on-call commands; need
                                       `Authorization: Bearer <abtest.action_token>` (read-only
                                       when the token is empty)
    GET /healthz

Every number on a page is rendered from the same scorecard dict the API returns, formatted by
`fmt` and carrying the raw value in `data-value`, so the browser test can check one against the
other. The variants' weights come from the store's experiment record (written when the A/B
file is registered: `register_ab_file`), else they are assumed equal (the page says so).
"""
from __future__ import annotations

import hmac
import json
import math
import threading
import time
from functools import lru_cache
from pathlib import Path

from onerec.abtest.guardrail import predictor_counts
from onerec.abtest.scorecard import scorecard
from onerec.abtest.store import ABStore
from onerec.config import Config

TEMPLATES = Path(__file__).parent / "templates"
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
DECISION_STYLE = {"ship": "good", "stop": "bad", "keep running": "wait"}


def fmt(value, digits: int = 4) -> str:
    """How every number is shown: 4 significant digits, thousands separators for counts, '-' for none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}"


def pct(value) -> str:
    return "-" if value is None else f"{value * 100:+.2f}%"


def when(ms: int | None) -> str:
    return "-" if ms is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def predictor_error_rate(metrics_url: str) -> float | None:
    """(refused + failed) / requests since the predictor started; None when unknown."""
    counts = predictor_counts(metrics_url)
    return counts[1] / counts[0] if counts and counts[0] else None


class Dashboard:
    """What the pages read: the store, the registry (model links, actions), the predictor's metrics."""

    def __init__(self, cfg: Config, store: ABStore, registry=None, mlflow_url: str | None = None,
                 metrics_url: str | None = None):
        self.cfg, self.store, self.registry, self.mlflow_url, self.metrics_url = cfg, store, registry, mlflow_url, metrics_url

    def experiments(self) -> list[dict]:
        return sorted(self.store.experiments(), key=lambda e: e["last_ms"], reverse=True)

    def card(self, name: str) -> dict:
        config = self.store.experiment_config(name)
        weights = {v["name"]: float(v["weight"]) for v in config["variants"]} if config else None
        error_rate = predictor_error_rate(self.metrics_url) if self.metrics_url else None
        card = scorecard(self.store, name, self.cfg.abtest, weights=weights, error_rate=error_rate)
        for v in card["variants"]:
            v["model_links"] = [{"version": m, "url": self.run_url(m)} for m in v["model_versions"]]
        return card

    def run_url(self, version: str) -> str | None:
        if not (self.registry and self.mlflow_url):
            return None
        try:
            return _run_url(self.registry, self.mlflow_url, version)
        except Exception:  # noqa: BLE001 - a missing link must not break the page (and is not cached: retried)
            return None


@lru_cache(maxsize=256)
def _run_url(registry, mlflow_url: str, version: str) -> str:
    """The MLflow UI page of the run that produced a model version (versions are immutable: cached;
    a failed lookup raises, and lru_cache keeps no exceptions, so a brief MLflow outage is not remembered)."""
    run_id = registry.version(version).run_id
    experiment_id = registry.client.get_run(run_id).info.experiment_id
    return f"{mlflow_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def charts(card: dict) -> dict:
    """Plotly figure specs (plain JSON) for the experiment page."""
    tl, variants = card["timeline"], [v["name"] for v in card["variants"]]
    x = [when(ms).removesuffix(" UTC") for ms in tl["ends_ms"]]   # Plotly reads these as dates (with " UTC": categories)
    lift = [c for c in card["comparisons"]]
    lift_fig = {"data": [{"type": "scatter", "mode": "markers", "name": c["treatment"],
                          "y": [f"{c['treatment']}: {m}" for m in (card["primary_metric"], *c["secondary"])],
                          "x": [c["primary"]["diff"], *(s["diff"] for s in c["secondary"].values())],
                          "error_x": {"type": "data", "symmetric": False,
                                      "array": [e["diff_high"] - e["diff"] for e in (c["primary"], *c["secondary"].values())],
                                      "arrayminus": [e["diff"] - e["diff_low"] for e in (c["primary"], *c["secondary"].values())]},
                          "marker": {"size": 10, "color": COLORS[(i + 1) % len(COLORS)]}} for i, c in enumerate(lift)],
                "layout": {"title": {"text": f"Lift vs {card['control']} with {1 - card['alpha']:.0%} CI"},
                           "xaxis": {"zeroline": True, "zerolinewidth": 2, "title": {"text": "treatment - control"}},
                           "yaxis": {"autorange": "reversed"},         # the scorecard's order, top down
                           "margin": {"l": 220}, "height": 320, "showlegend": False}}
    points = tl["cumulative_lift"]
    have = [i for i, p in enumerate(points) if "diff" in p]
    cumulative = {"data": [
        {"type": "scatter", "mode": "lines", "name": "CI high", "x": [x[i] for i in have],
         "y": [points[i]["diff_high"] for i in have], "line": {"width": 0}, "showlegend": False},
        {"type": "scatter", "mode": "lines", "name": f"{1 - card['alpha']:.0%} CI", "x": [x[i] for i in have],
         "y": [points[i]["diff_low"] for i in have], "fill": "tonexty", "line": {"width": 0},
         "fillcolor": "rgba(31,119,180,0.2)"},
        {"type": "scatter", "mode": "lines+markers", "name": "lift", "x": [x[i] for i in have],
         "y": [points[i]["diff"] for i in have], "line": {"color": COLORS[0]}}],
        "layout": {"title": {"text": f"Cumulative lift of {card['primary_metric']} ({variants[1] if len(variants) > 1 else '-'} - "
                             f"{card['control']})"}, "height": 320, "yaxis": {"zeroline": True, "zerolinewidth": 2},
                   "xaxis": {"type": "date", "title": {"text": "UTC"}}}}
    series = {"data": [{"type": "scatter", "mode": "lines+markers", "name": v, "x": x, "y": tl["series"][v],
                        "line": {"color": COLORS[i % len(COLORS)]}} for i, v in enumerate(variants)],
              "layout": {"title": {"text": f"{card['primary_metric']} per {tl['unit']} (users active in it)"},
                         "height": 320, "xaxis": {"type": "date", "title": {"text": "UTC"}}}}
    return {"lift": lift_fig, "cumulative": cumulative, "series": series}


def create_app(dashboard: Dashboard):
    from fastapi import FastAPI, Header, HTTPException
    from fastapi.responses import HTMLResponse
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from plotly.offline import get_plotlyjs

    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["html"]))
    env.filters.update(fmt=fmt, pct=pct, when=when, raw=lambda v: "" if v is None else v)
    plotly_js = get_plotlyjs()
    token = dashboard.cfg.abtest.action_token
    app = FastAPI(title="onerec A/B dashboard", docs_url=None, redoc_url=None)

    def render(name: str, **values) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(refresh_s=dashboard.cfg.abtest.refresh_s, **values))

    def card_or_404(name: str) -> dict:
        try:
            return dashboard.card(name)
        except KeyError as exc:
            raise HTTPException(404, str(exc).strip("'\"")) from None

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True, "schema": dashboard.store.revision()}

    @app.get("/api/experiments")
    def api_experiments() -> list[dict]:
        return dashboard.experiments()

    @app.get("/api/experiments/{name:path}")          # :path: a name may hold a "/" (the index links it so)
    def api_experiment(name: str) -> dict:
        return card_or_404(name)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return render("index.html", experiments=dashboard.experiments())

    @app.get("/experiments/{name:path}", response_class=HTMLResponse)
    def experiment(name: str) -> HTMLResponse:
        card = card_or_404(name)
        return render("experiment.html", card=card, charts=json.dumps(charts(card)).replace("<", "\\u003c"), plotly_js=plotly_js,
                      decision_style=DECISION_STYLE[card["decision"]], actions=bool(token and dashboard.registry))

    @app.post("/api/model/{action}")
    def model_action(action: str, reason: str = "", authorization: str = Header(default="")) -> dict:
        if not token:
            raise HTTPException(403, "actions are disabled: the dashboard is read-only (abtest.action_token is empty)")
        if not hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
            raise HTTPException(401, "a valid `Authorization: Bearer <token>` header is required")
        if action not in ("promote", "rollback") or dashboard.registry is None:
            raise HTTPException(404, f"no action {action!r} (promote | rollback, with a registry)")
        from onerec.registry import RegistryError

        try:
            move = getattr(dashboard.registry, action)(reason=reason or f"from the A/B dashboard ({action})")
        except RegistryError as exc:
            raise HTTPException(409, str(exc)) from None
        return {"action": move.action, "changes": [list(c) for c in move.changes], "reason": move.reason}

    return app


def register_ab_file(store: ABStore, path: str | Path) -> str:
    """Record an A/B file's experiment (variants, aliases, weights) in the store -> its name."""
    import yaml

    from onerec.serve import ABConfig

    text = Path(path).read_text()
    ab = ABConfig.parse(yaml.safe_load(text), str(path))
    store.register_experiment(ab.experiment, [{"name": v.name, "alias": v.alias, "weight": v.weight}
                                              for v in ab.variants])
    return ab.experiment


def open_dashboard(cfg: Config, metrics_url: str | None = None) -> Dashboard:
    """The dashboard on the configured endpoints (the registry only when MLflow is set)."""
    from onerec.endpoints import ab_store_url, resolve_endpoints
    from onerec.registry import Registry

    store = ABStore.open(ab_store_url(cfg.stack.state_dir))
    if cfg.serving.ab_config:
        register_ab_file(store, cfg.serving.ab_config)
    uri = resolve_endpoints(cfg.stack.state_dir).mlflow_tracking_uri
    registry = Registry.connect(uri, cfg.registry.model_name) if uri else None
    return Dashboard(cfg, store, registry=registry, mlflow_url=uri, metrics_url=metrics_url)


def page_values(page: str) -> dict[str, float | str | None]:
    """The numbers an experiment page shows, from their data-value attributes, by where they are:
    "<variant>:<field>" (variants table), "<treatment>:<metric>:<field>" (scorecard), "decision",
    "srm_p". Numbers as floats (ints compare equal), '' as None, anything else as text."""
    from html.parser import HTMLParser

    values: dict[str, float | str | None] = {}

    class Reader(HTMLParser):
        row: tuple[str, ...] = ()

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "tr":
                self.row = tuple(x for x in (a.get("data-variant"), a.get("data-comparison"), a.get("data-metric")) if x)
            if "data-value" not in a:
                return
            key = {"decision": "decision", "health-srm": "srm_p"}.get(a.get("id") or (a.get("class") or ""))
            if key is None and "data-field" in a and self.row:
                key = ":".join((*self.row, a["data-field"]))
            if key is not None:
                values[key] = _parsed(a["data-value"])

    Reader().feed(page)
    return values


def _parsed(text: str) -> float | str | None:
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


class DashboardServer:
    """The app on uvicorn in a background thread (the demo, tests): `with DashboardServer(app) as url:`."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, start_timeout_s: float = 30.0):
        import uvicorn

        from onerec.stack import free_port

        self.port = port or free_port()
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=self.port, log_level="warning"))
        self.start_timeout_s = start_timeout_s
        self.thread = threading.Thread(target=self.server.run, name="dashboard", daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard did not start on {self.url}")
            time.sleep(0.05)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
