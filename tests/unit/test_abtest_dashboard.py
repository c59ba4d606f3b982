"""The A/B dashboard (onerec/abtest/dashboard.py) through FastAPI's TestClient on seeded stores:
every number a page shows is the API's (data-value) formatted by fmt; the page works offline and
escapes what the store holds; the on-call actions need the token; the predictor's error rate."""
from __future__ import annotations

import dataclasses
import json
from html.parser import HTMLParser
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from plotly.offline import get_plotlyjs

from onerec.abtest import dashboard as dash
from onerec.abtest.dashboard import (
    Dashboard,
    create_app,
    fmt,
    pct,
    predictor_error_rate,
    when,
)
from onerec.abtest.guardrail import predictor_counts
from onerec.abtest.store import ABStore
from onerec.config import load_config
from onerec.registry import AliasMove, RegistryError
from tests.abtest_data import (
    DAY_MS,
    START_MS,
    MetricsServer,
    exposition,
    seed_experiment,
    unreachable_url,
)

CFG = load_config("debug")
XSS = '<script>alert("x")</script> & \'quoted\''
XSS_VARIANTS = ("<i>ctl</i>", 'tr"t')
MLFLOW = "http://mlflow.test:5000/"


def with_abtest(cfg=CFG, **changes):
    return dataclasses.replace(cfg, abtest=dataclasses.replace(cfg.abtest, **changes))


# ------------------------------------------------------------------ fakes


class FakeRegistry:
    """The registry's on-call commands and the lookups the model links need; `fail` makes the
    commands raise RegistryError, `broken` makes the lookups raise (MLflow down)."""

    def __init__(self, fail: str | None = None, broken: int = 0):
        self.fail, self.broken, self.calls = fail, broken, []
        self.client = SimpleNamespace(get_run=self._get_run)

    def _command(self, action: str, changes, reason: str) -> AliasMove:
        self.calls.append((action, reason))
        if self.fail:
            raise RegistryError(self.fail)
        return AliasMove(action, changes, reason, applied=True)

    def rollback(self, to=None, *, reason="", dry_run=False) -> AliasMove:
        return self._command("rollback", (("champion", "4", "3"),), reason)

    def promote(self, version=None, *, reason="", dry_run=False) -> AliasMove:
        return self._command("promote", (("champion", "3", "4"), ("challenger", "4", None)), reason)

    def version(self, version: str):
        self.calls.append(("version", version))
        if self.broken:
            self.broken -= 1
            raise RegistryError("MLflow is unreachable")
        return SimpleNamespace(version=version, run_id=f"run-{version}")

    def _get_run(self, run_id: str):
        return SimpleNamespace(info=SimpleNamespace(experiment_id="7"))


# ------------------------------------------------------------------ reading pages


class Page(HTMLParser):
    """What the tests read of a page: the elements with a data-value or an id (attributes, text,
    the table row they are in), the scripts, the meta tags, the links."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.values: list[dict] = []
        self.ids: dict[str, dict] = {}
        self.scripts: list[dict] = []
        self.metas: list[dict] = []
        self.links: list[dict] = []
        self.tags: list[tuple[str, dict]] = []
        self.title = ""
        self._open: list[dict] = []
        self._row: dict = {}
        self._in: str | None = None
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        a = {k: (v if v is not None else "") for k, v in attrs}
        self.tags.append((tag, a))
        if tag == "tr":
            self._row = a
        if tag == "meta":
            self.metas.append(a)
        if tag in ("script", "title"):
            self._in = tag
            if tag == "script":
                self.scripts.append({"attrs": a, "text": ""})
        if "data-value" in a or "id" in a or (tag == "a" and "href" in a) or "data-model" in a:
            element = {"tag": tag, "attrs": a, "row": self._row, "text": ""}
            if "data-value" in a:
                self.values.append(element)
            if "id" in a:
                self.ids[a["id"]] = element
            if "data-model" in a:
                self.links.append(element)
            self._open.append(element)

    def handle_endtag(self, tag):
        if self._open and self._open[-1]["tag"] == tag:
            self._open.pop()
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        for element in self._open:
            element["text"] += data
        if self._in == "script":
            self.scripts[-1]["text"] += data
        elif self._in == "title":
            self.title += data

    def cell(self, **where) -> dict:
        """The one element whose attributes and row match `where` (row keys prefixed with row_)."""
        found = [e for e in self.values
                 if all((e["row"] if k.startswith("row_") else e["attrs"]).get(k.removeprefix("row_").replace("_", "-"))
                        == v for k, v in where.items())]
        assert len(found) == 1, (where, len(found))
        return found[0]

    def charts(self) -> dict:
        (script,) = [s for s in self.scripts if "const charts = " in s["text"]]
        text = script["text"].split("const charts = ", 1)[1]
        return json.JSONDecoder().raw_decode(text)[0]


def number(text: str):
    """A data-value: '' is None, else the float (both the page and the API are Python reprs)."""
    return None if text == "" else float(text)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = ABStore.open(f"sqlite:///{tmp_path_factory.mktemp('dash')}/ab.db")
    seed_experiment(s, "exp-1", users=300, lift=0.2, first_user=0)
    seed_experiment(s, "older", users=40, days=1, start_ms=START_MS - 10 * DAY_MS, first_user=10_000)
    seed_experiment(s, XSS, users=40, variants=XSS_VARIANTS, first_user=20_000)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(store):
    with TestClient(create_app(Dashboard(CFG, store))) as c:
        yield c


@pytest.fixture(scope="module")
def exp1(client):
    """exp-1's page (parsed, and as text) and its API card, each fetched once."""
    response = client.get("/experiments/exp-1")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    api = client.get("/api/experiments/exp-1")
    assert api.status_code == 200
    return SimpleNamespace(html=response.text, page=Page(response.text), card=api.json())


# ------------------------------------------------------------------ index and API


def test_the_index_lists_the_experiments_newest_first(client, store):
    page = Page(client.get("/").text)
    rows = [a["data-experiment"] for tag, a in page.tags if tag == "tr" and "data-experiment" in a]
    expected = sorted(store.experiments(), key=lambda e: e["last_ms"], reverse=True)
    assert rows == [e["name"] for e in expected] and set(rows) == {"exp-1", "older", XSS}
    assert rows[-1] == "older"
    for e in expected:
        for field in ("users", "exposures"):
            element = page.cell(row_data_experiment=e["name"], data_field=field)
            assert int(element["attrs"]["data-value"]) == e[field] and element["text"] == fmt(e[field])
    anchors = [a["href"] for tag, a in page.tags if tag == "a" and a.get("href", "").startswith("/experiments/")]
    assert anchors[0] in ("/experiments/exp-1", "/experiments/" + quote(XSS)) and len(anchors) == 3
    assert "/experiments/exp-1" in anchors and "no-experiments" not in page.ids


def test_every_index_link_opens_its_page(client):
    page = Page(client.get("/").text)
    anchors = [a["href"] for tag, a in page.tags if tag == "a" and a.get("href", "").startswith("/experiments/")]
    for href in anchors:
        response = client.get(href)
        assert response.status_code == 200, href       # a name with a "/" too (the XSS one has one)


def test_an_empty_store_says_so(tmp_path):
    empty = ABStore.open(f"sqlite:///{tmp_path}/empty.db")
    with TestClient(create_app(Dashboard(CFG, empty))) as c:
        page = Page(c.get("/").text)
        assert "No experiment has exposures" in page.ids["no-experiments"]["text"]
        assert "experiments" not in page.ids                         # no table
        assert c.get("/api/experiments").json() == []
        assert c.get("/healthz").json() == {"ok": True, "schema": empty.revision()}
    empty.close()


def test_the_api_lists_the_experiments(client, store):
    listed = client.get("/api/experiments").json()
    assert listed == sorted(store.experiments(), key=lambda e: e["last_ms"], reverse=True)
    assert {e["name"]: e["variants"] for e in listed}["exp-1"] == ["control", "treatment"]


def test_an_unknown_experiment_is_404_with_a_message(client):
    for path in ("/api/experiments/nope", "/experiments/nope"):
        response = client.get(path)
        assert response.status_code == 404
        assert response.json() == {"detail": "experiment 'nope' has no exposures in the A/B store"}


def test_the_api_card_is_the_scorecard_with_model_links(exp1, store):
    from onerec.abtest.scorecard import scorecard

    card = exp1.card
    weights = {v["name"]: float(v["weight"]) for v in store.experiment_config("exp-1")["variants"]}
    direct = scorecard(store, "exp-1", CFG.abtest, weights=weights, now_ms=card["generated_ms"])
    for v in card["variants"]:
        assert v.pop("model_links") == [{"version": m, "url": None} for m in v["model_versions"]]
    assert card == json.loads(json.dumps(direct))
    assert card["decision"] == "ship" and card["health"]["srm"]["weights_from"] == "A/B config"


# ------------------------------------------------------------------ the experiment page


def test_the_variants_table_shows_the_api_numbers(exp1):
    page, card = exp1.page, exp1.card
    fields = ("weight", "users", "exposures", "primary", "reward_per_exposure", "reaction_rate", "coverage",
              "novelty_bits", "p99_latency_ms", "fallback_rate")
    for v in card["variants"]:
        for field in fields:
            element = page.cell(row_data_variant=v["name"], data_field=field)
            assert number(element["attrs"]["data-value"]) == v[field], (v["name"], field)
            assert element["text"] == fmt(v[field]), (v["name"], field)
        assert isinstance(v["users"], int) and "," in fmt(1000)          # counts are formatted as counts
        models = [el["attrs"]["data-model"] for el in page.links if el["row"].get("data-variant") == v["name"]]
        assert models == v["model_versions"]


def test_the_scorecard_table_shows_the_api_numbers(exp1):
    page, card = exp1.page, exp1.card
    (comp,) = card["comparisons"]
    rows = [("primary", comp["primary"]), *sorted(comp["secondary"].items())]
    for metric, e in rows:
        def cell(field, metric=metric):
            return page.cell(row_data_comparison=comp["treatment"], row_data_metric=metric, data_field=field)

        for field in ("metric_control", "metric_treatment", "diff"):
            assert number(cell(field)["attrs"]["data-value"]) == e[field] and cell(field)["text"] == fmt(e[field])
        low, high = cell("diff_ci")["attrs"]["data-value"].split(",")
        assert (number(low), number(high)) == (e["diff_low"], e["diff_high"])
        assert cell("diff_ci")["text"] == f"[{fmt(e['diff_low'])}, {fmt(e['diff_high'])}]"
        assert number(cell("rel")["attrs"]["data-value"]) == e["rel"] and cell("rel")["text"] == pct(e["rel"])
        low, high = cell("rel_ci")["attrs"]["data-value"].split(",")
        assert (number(low), number(high)) == (e["rel_low"], e["rel_high"])
        assert cell("rel_ci")["text"] == f"[{pct(e['rel_low'])}, {pct(e['rel_high'])}]"
        assert number(cell("p_value")["attrs"]["data-value"]) == e["p_value"]
        assert cell("p_value")["text"] == fmt(e["p_value"], 3)
    notes = {f: page.cell(row_data_comparison=comp["treatment"], row_data_metric="notes", data_field=f)
             for f in ("always_valid_p", "variance_reduction")}
    assert number(notes["always_valid_p"]["attrs"]["data-value"]) == comp["always_valid_p"]
    assert notes["always_valid_p"]["text"] == fmt(comp["always_valid_p"], 3)
    reduction = comp["cuped"]["variance_reduction"]
    assert number(notes["variance_reduction"]["attrs"]["data-value"]) == reduction and reduction > 0
    assert notes["variance_reduction"]["text"] == pct(reduction)


def test_the_health_and_decision_banners_show_the_api_values(exp1):
    page, card = exp1.page, exp1.card
    h = card["health"]
    srm = page.ids["health-srm"]
    assert number(srm["attrs"]["data-value"]) == h["srm"]["p_value"]
    assert f"χ² p {fmt(h['srm']['p_value'], 3)}" in srm["text"] and "weights A/B config" in srm["text"]
    for g in h["guardrails"]:
        (element,) = [e for e in page.values if e["attrs"].get("data-guardrail") == f"{g['name']}:{g['variant'] or 'all'}"]
        assert number(element["attrs"]["data-value"]) == g["value"]
        assert f"{fmt(g['value'], 3)} / {fmt(g['limit'], 3)}" in element["text"]
        assert element["attrs"]["class"].split()[-1] == ("good" if g["ok"] else "wait" if g["ok"] is None else "bad")
    min_data = page.ids["health-min-data"]
    assert number(min_data["attrs"]["data-value"]) == h["min_data"]["users_per_variant"]
    assert f"users/variant {fmt(h['min_data']['users_per_variant'])} of {fmt(h['min_data']['needed'])}" in \
        " ".join(min_data["text"].split())
    assert page.ids["health"]["attrs"]["class"] == "banner good"
    (decision,) = [e for e in page.values if e["attrs"].get("class") == "decision"]
    assert decision["attrs"]["data-value"] == card["decision"] == decision["text"] == "ship"
    assert page.ids["decision"]["attrs"]["class"] == "banner good"
    assert page.ids["decision-reason"]["text"] == card["decision_reason"]


def test_the_page_works_offline(exp1):
    plotly_js = get_plotlyjs()
    assert plotly_js in exp1.html                                         # inlined, whole
    assert all("src" not in s["attrs"] for s in exp1.page.scripts)        # no <script src=...>
    assert all(a.get("href", "").startswith("data:") for tag, a in exp1.page.tags if tag == "link")   # nothing fetched
    # plotly.js itself names a CDN in its (unused: geo maps) topojson default; the page names none
    assert "cdn" not in exp1.html.replace(plotly_js, "").lower()
    assert "http://" not in exp1.html.replace(plotly_js, "") and "https://" not in exp1.html.replace(plotly_js, "")


def test_the_charts(exp1):
    page, card = exp1.page, exp1.card
    for name in ("lift", "cumulative", "series"):
        assert page.ids[f"chart-{name}"]["tag"] == "div"
    charts = page.charts()
    assert charts == json.loads(json.dumps(dash.charts(card)))
    (comp,) = card["comparisons"]
    (trace,) = charts["lift"]["data"]
    estimates = [comp["primary"], *comp["secondary"].values()]
    assert trace["name"] == "treatment" and trace["x"] == [e["diff"] for e in estimates]
    assert len(trace["y"]) == len(estimates) and all(y.startswith("treatment") for y in trace["y"])
    assert trace["error_x"]["array"] == [e["diff_high"] - e["diff"] for e in estimates]
    assert trace["error_x"]["arrayminus"] == [e["diff"] - e["diff_low"] for e in estimates]
    for e, x, plus, minus in zip(estimates, trace["x"], trace["error_x"]["array"], trace["error_x"]["arrayminus"]):
        assert x + plus == pytest.approx(e["diff_high"]) and x - minus == pytest.approx(e["diff_low"])
    tl = card["timeline"]
    high, low, lift = charts["cumulative"]["data"]
    have = [p for p in tl["cumulative_lift"] if "diff" in p]
    assert len(have) >= len(tl["ends_ms"]) - 2 and low["fill"] == "tonexty"
    assert (high["y"], low["y"], lift["y"]) == ([p["diff_high"] for p in have], [p["diff_low"] for p in have],
                                                [p["diff"] for p in have])
    assert len(lift["x"]) == len(have)
    assert [t["name"] for t in charts["series"]["data"]] == ["control", "treatment"]
    assert [t["y"] for t in charts["series"]["data"]] == [tl["series"]["control"], tl["series"]["treatment"]]
    assert all(len(t["x"]) == len(tl["ends_ms"]) for t in charts["series"]["data"])


def test_the_page_refreshes_itself(exp1, store):
    (refresh,) = [m for m in exp1.page.metas if m.get("http-equiv") == "refresh"]
    assert int(refresh["content"]) == CFG.abtest.refresh_s == 30
    with TestClient(create_app(Dashboard(with_abtest(refresh_s=7), store))) as c:
        (refresh,) = [m for m in Page(c.get("/").text).metas if m.get("http-equiv") == "refresh"]
        assert refresh["content"] == "7"


def test_names_from_the_store_are_escaped(client):
    response = client.get("/experiments/" + quote(XSS, safe=""))
    assert response.status_code == 200
    html = response.text.replace(get_plotlyjs(), "")
    page = Page(response.text)
    assert "<script>alert" not in html and "<i>ctl</i>" not in html and 'tr"t' not in html
    assert "&lt;script&gt;alert" in html
    assert page.ids["experiment-name"]["text"] == XSS and page.title.startswith(XSS)
    # the only scripts are the page's own: plotly and the charts (no action buttons: read-only)
    assert len(page.scripts) == 2 and html.count("</script>") == 2
    assert [a["data-variant"] for tag, a in page.tags if tag == "tr" and "data-variant" in a] == list(XSS_VARIANTS)
    charts = page.charts()                          # the names in the charts' JSON: escaped, and intact
    assert [t["name"] for t in charts["series"]["data"]] == list(XSS_VARIANTS)
    assert client.get("/api/experiments/" + quote(XSS, safe="")).json()["experiment"] == XSS


# ------------------------------------------------------------------ actions


def test_actions_are_off_without_a_token(store):
    registry = FakeRegistry()
    assert CFG.abtest.action_token == ""
    with TestClient(create_app(Dashboard(CFG, store, registry=registry))) as c:
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
            response = c.post("/api/model/rollback", headers=headers)
            assert response.status_code == 403 and "read-only" in response.json()["detail"]
        assert "Roll the champion back" not in c.get("/experiments/exp-1").text
    assert registry.calls == []


@pytest.fixture(scope="module")
def guarded(store):
    """The dashboard with an action token and a fake registry."""
    registry = FakeRegistry()
    with TestClient(create_app(Dashboard(with_abtest(action_token="s3cret"), store, registry=registry))) as c:
        yield c, registry


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                                     {"Authorization": "Bearer s3cret "}, {"Authorization": "bearer s3cret"}])
def test_a_wrong_token_is_401(guarded, headers):
    c, registry = guarded
    before = list(registry.calls)
    response = c.post("/api/model/rollback", params={"reason": "x"}, headers=headers)
    assert response.status_code == 401 and "Bearer" in response.json()["detail"]
    assert registry.calls == before


def test_the_right_token_acts_with_the_reason(guarded):
    c, registry = guarded
    auth = {"Authorization": "Bearer s3cret"}
    response = c.post("/api/model/rollback", params={"reason": "p99 regression"}, headers=auth)
    assert response.status_code == 200
    assert response.json() == {"action": "rollback", "changes": [["champion", "4", "3"]], "reason": "p99 regression"}
    assert registry.calls[-1] == ("rollback", "p99 regression")
    response = c.post("/api/model/promote", headers=auth)                      # no reason: a default one
    assert response.status_code == 200 and response.json()["changes"] == [["champion", "3", "4"], ["challenger", "4", None]]
    assert registry.calls[-1] == ("promote", "from the A/B dashboard (promote)")
    assert c.post("/api/model/delete", headers=auth).status_code == 404
    assert "Roll the champion back" in c.get("/experiments/exp-1").text       # the buttons show


def test_a_registry_error_is_409(store):
    registry = FakeRegistry(fail="version 3 is already the champion")
    with TestClient(create_app(Dashboard(with_abtest(action_token="s3cret"), store, registry=registry))) as c:
        response = c.post("/api/model/rollback", params={"reason": "r"}, headers={"Authorization": "Bearer s3cret"})
    assert response.status_code == 409 and response.json() == {"detail": "version 3 is already the champion"}
    assert registry.calls == [("rollback", "r")]


def test_a_token_without_a_registry_has_no_actions(store):
    with TestClient(create_app(Dashboard(with_abtest(action_token="s3cret"), store))) as c:
        assert c.post("/api/model/rollback", headers={"Authorization": "Bearer s3cret"}).status_code == 404
        assert "Roll the champion back" not in c.get("/experiments/exp-1").text


# ------------------------------------------------------------------ model links


def test_model_links_point_at_the_mlflow_runs(store):
    registry = FakeRegistry()
    with TestClient(create_app(Dashboard(CFG, store, registry=registry, mlflow_url=MLFLOW))) as c:
        card = c.get("/api/experiments/exp-1").json()
        page = Page(c.get("/experiments/exp-1").text)
    assert [v["model_links"] for v in card["variants"]] == [
        [{"version": "3", "url": "http://mlflow.test:5000/#/experiments/7/runs/run-3"}],
        [{"version": "4", "url": "http://mlflow.test:5000/#/experiments/7/runs/run-4"}]]
    links = {el["attrs"]["data-model"]: (el["tag"], el["attrs"].get("href"), el["text"]) for el in page.links}
    assert links == {"3": ("a", "http://mlflow.test:5000/#/experiments/7/runs/run-3", "v3"),
                     "4": ("a", "http://mlflow.test:5000/#/experiments/7/runs/run-4", "v4")}


def test_a_failing_registry_gives_no_link_but_the_page(store):
    registry = FakeRegistry(broken=10**6)
    with TestClient(create_app(Dashboard(CFG, store, registry=registry, mlflow_url=MLFLOW))) as c:
        response = c.get("/experiments/exp-1")
        assert response.status_code == 200
        links = {el["attrs"]["data-model"]: (el["tag"], el["attrs"].get("href")) for el in Page(response.text).links}
        assert links == {"3": ("span", None), "4": ("span", None)}
        assert [v["model_links"] for v in c.get("/api/experiments/exp-1").json()["variants"]] == [
            [{"version": "3", "url": None}], [{"version": "4", "url": None}]]


def test_a_failed_link_lookup_is_retried_not_cached(store):
    """MLflow briefly down at the first look: the next page has the links (versions are cached, failures not)."""
    board = Dashboard(CFG, store, registry=FakeRegistry(broken=1), mlflow_url=MLFLOW)
    assert board.run_url("4") is None
    assert board.run_url("4") == "http://mlflow.test:5000/#/experiments/7/runs/run-4"
    board.registry.broken = 5
    assert board.run_url("4") == "http://mlflow.test:5000/#/experiments/7/runs/run-4"       # a success is cached
    assert Dashboard(CFG, store, registry=FakeRegistry()).run_url("4") is None              # no MLflow URL


# ------------------------------------------------------------------ formatting


@pytest.mark.parametrize(("value", "args", "shown"), [
    (None, (), "-"), (float("nan"), (), "-"), (float("inf"), (), "-"), (float("-inf"), (), "-"),
    (True, (), "yes"), (False, (), "no"), (0, (), "0"), (7, (), "7"), (1234567, (), "1,234,567"), (-1200, (), "-1,200"),
    (0.0, (), "0"), (2.0, (), "2"), (0.123456, (), "0.1235"), (1234.5678, (), "1235"), (-0.5, (), "-0.5"),
    (12345.678, (), "1.235e+04"), (1e-7, (), "1e-07"), (0.000123456, (3,), "0.000123"), (0.98765, (3,), "0.988"),
])
def test_fmt(value, args, shown):
    assert fmt(value, *args) == shown


@pytest.mark.parametrize(("value", "shown"), [(None, "-"), (0.1234, "+12.34%"), (-0.05, "-5.00%"), (0, "+0.00%"),
                                              (0.000049, "+0.00%"), (1.5, "+150.00%")])
def test_pct(value, shown):
    assert pct(value) == shown


@pytest.mark.parametrize(("ms", "shown"), [(None, "-"), (0, "1970-01-01 00:00:00 UTC"),
                                           (1_999, "1970-01-01 00:00:01 UTC"),
                                           (START_MS, "2025-12-01 00:00:00 UTC"),
                                           (START_MS + DAY_MS - 1, "2025-12-01 23:59:59 UTC")])
def test_when(ms, shown):
    assert when(ms) == shown


# ------------------------------------------------------------------ the predictor's error rate


def test_the_predictor_error_rate_from_its_metrics():
    with MetricsServer(exposition(requests=200, overloaded=3, failures=1, bad_requests=50)) as server:
        assert predictor_counts(server.url) == (200.0, 4.0)
        assert predictor_error_rate(server.url) == 0.02                 # bad requests (400s) are not errors
        server.text = exposition(requests=0, overloaded=0, failures=0)
        assert predictor_error_rate(server.url) is None                  # nothing served yet: unknown
        server.text = "<html><body>this is not /metrics</body></html>"
        assert predictor_counts(server.url) is None and predictor_error_rate(server.url) is None
        assert server.hits == 5


def test_the_predictor_error_rate_from_prometheus_client_itself():
    """The same counters as the predictor declares them, written by prometheus_client."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    reg = CollectorRegistry()
    seconds = Histogram("onerec_serving_request_seconds", "predict() per HTTP request", registry=reg)
    bad = Counter("onerec_serving_bad_requests", "400", registry=reg)
    overloaded = Counter("onerec_serving_overloaded", "503", registry=reg)
    failures = Counter("onerec_serving_failures", "500", registry=reg)
    for _ in range(40):
        seconds.observe(0.003)
    bad.inc(7)
    overloaded.inc(1)
    failures.inc(1)
    with MetricsServer(generate_latest(reg).decode()) as server:
        assert predictor_counts(server.url) == (40.0, 2.0)
        assert predictor_error_rate(server.url) == 0.05


def test_an_unreachable_predictor_has_no_error_rate():
    url = unreachable_url()
    assert predictor_counts(url) is None and predictor_error_rate(url) is None
    assert predictor_counts("not a url") is None


def test_the_error_rate_reaches_the_page(store):
    with MetricsServer(exposition(requests=200, overloaded=3, failures=1)) as server, \
            TestClient(create_app(Dashboard(CFG, store, metrics_url=server.url))) as c:
        card = c.get("/api/experiments/exp-1").json()
        page = Page(c.get("/experiments/exp-1").text)
    (check,) = [g for g in card["health"]["guardrails"] if g["name"] == "error_rate"]
    assert check == {"name": "error_rate", "variant": None, "value": 0.02, "limit": 0.01, "ok": False}
    assert card["decision"] == "stop" and card["decision_reason"] == "guardrail breached: error_rate"
    (element,) = [e for e in page.values if e["attrs"].get("data-guardrail") == "error_rate:all"]
    assert number(element["attrs"]["data-value"]) == 0.02 and "bad" in element["attrs"]["class"]
    assert page.ids["health"]["attrs"]["class"] == "banner bad" and page.ids["decision"]["attrs"]["class"] == "banner bad"


def test_a_single_variant_experiment_renders(tmp_path):
    """Only the control has served yet: no comparison, no lift charts' traces, still a page."""
    solo = ABStore.open(f"sqlite:///{tmp_path}/solo.db")
    seed_experiment(solo, "solo", users=30, split=(1, 0))
    with TestClient(create_app(Dashboard(CFG, solo))) as c:
        response = c.get("/experiments/solo")
    assert response.status_code == 200
    page = Page(response.text)
    charts = page.charts()
    assert charts["lift"]["data"] == [] and [t["y"] for t in charts["cumulative"]["data"]] == [[], [], []]
    assert [t["name"] for t in charts["series"]["data"]] == ["control"]
    assert page.ids["decision-reason"]["text"] == "only one variant has enough users to compare"
    srm = page.ids["health-srm"]
    assert srm["attrs"]["data-value"] == "" and "sample ratio unknown" in srm["text"] and "p -," in srm["text"]
    solo.close()
