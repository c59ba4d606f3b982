"""onerec.registry without a server: the champion history, the list table, all-or-nothing moves
(against a small in-memory stand-in for MlflowClient) and the reachability check."""
from __future__ import annotations

import http.server
import json
import threading
import time
from types import SimpleNamespace

import pytest

from onerec import registry
from onerec.registry import (AuditEvent, ModelVersionInfo, Registry, RegistryError, champion_history,
                             check_reachable, format_versions)
from tests.conftest import free_port


# --------------------------------------------------------------------------- champion_history

def _ev(action: str, alias: str, frm: str | None, to: str | None) -> AuditEvent:
    return AuditEvent("2024-01-01T00:00:00.000Z", "tester", action, alias, frm, to, "")


def test_history_promote_pushes_and_rollback_to_the_previous_pops():
    events = [_ev("register-alias", "champion", None, "1"),
              _ev("promote", "champion", "1", "2"),
              _ev("promote", "champion", "2", "3")]
    assert champion_history(events) == ["1", "2", "3"]
    events.append(_ev("rollback", "champion", "3", "2"))
    assert champion_history(events) == ["1", "2"]
    events.append(_ev("rollback", "champion", "2", "1"))
    assert champion_history(events) == ["1"]
    events.append(_ev("promote", "champion", "1", "4"))
    assert champion_history(events) == ["1", "4"]


def test_history_rollback_to_a_version_not_just_below_pushes():
    events = [_ev("register-alias", "champion", None, "1"),
              _ev("promote", "champion", "1", "2"),
              _ev("promote", "champion", "2", "3"),
              _ev("rollback", "champion", "3", "1")]      # --to 1, skipping 2
    assert champion_history(events) == ["1", "2", "3", "1"]
    # and a plain rollback from there goes back to 3, the champion before 1
    events.append(_ev("rollback", "champion", "1", "3"))
    assert champion_history(events) == ["1", "2", "3"]
    # a first rollback --to with a single champion on record pushes too
    assert champion_history([_ev("register-alias", "champion", None, "5"),
                             _ev("rollback", "champion", "5", "2")]) == ["5", "2"]


def test_history_ignores_challenger_events_and_deletions():
    events = [_ev("register-alias", "challenger", None, "1"),
              _ev("register-alias", "champion", None, "1"),
              _ev("promote", "challenger", "1", None),
              _ev("register-alias", "challenger", None, "2"),
              _ev("promote", "champion", "1", "2"),
              _ev("promote", "challenger", "2", None),
              _ev("register-alias", "challenger", None, "1"),    # would pop if it counted
              _ev("rollback", "challenger", "1", "1"),
              _ev("rollback", "champion", "2", None)]          # a deleted champion pushes nothing
    assert champion_history(events) == ["1", "2"]
    assert champion_history([]) == []


# --------------------------------------------------------------------------- format_versions

NOW = 1_700_000_000.0


def _row(version, aliases=(), age_s=0.0, **tags) -> ModelVersionInfo:
    return ModelVersionInfo(version, tuple(aliases), int((NOW - age_s) * 1000), f"run{version}",
                            f"runs:/run{version}/model", tags)


def test_format_versions_one_row_per_version_with_aliases_metrics_and_age():
    rows = [_row("3", ("challenger",), 5, test_ndcg_at_10="0.0912", test_recall_at_10="0.1501",
                 data_snapshot="2024-03-01T00:00:00", beats_champion="true"),
            _row("2", (), 2 * 3600, test_ndcg_at_10="0.0800"),
            _row("1", ("champion", "stable"), 3 * 86400 + 60, test_ndcg_at_10="0.0750",
                 test_recall_at_10="0.1300", beats_champion="false")]
    lines = format_versions(rows, "ndcg@10", now=NOW).splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["version", "aliases", "ndcg@10", "recall@10", "age", "snapshot", "beats",
                                "champion"]
    assert lines[1].split() == ["3", "challenger", "0.0912", "0.1501", "5s", "2024-03-01T00:00:00", "true"]
    assert lines[2].split() == ["2", "-", "0.0800", "-", "2h", "-", "-"]
    assert lines[3].split() == ["1", "champion,stable", "0.0750", "0.1300", "3d", "-", "false"]
    # columns line up: every row's metric value starts under its header
    col = lines[0].index("ndcg@10")
    assert [line[col:].split()[0] for line in lines[1:]] == ["0.0912", "0.0800", "0.0750"]


def test_format_versions_selected_metric_first_without_repeating_it():
    rows = [_row("1", age_s=120, test_ndcg_at_10="0.07", test_recall_at_10="0.13")]
    lines = format_versions(rows, "recall@10", now=NOW).splitlines()
    assert lines[0].split()[:5] == ["version", "aliases", "recall@10", "ndcg@10", "age"]
    assert lines[1].split()[:5] == ["1", "-", "0.13", "0.07", "2m"]
    assert lines[0].count("recall@10") == 1


def test_format_versions_empty():
    assert format_versions([], "ndcg@10", now=NOW) == "no versions registered"


# --------------------------------------------------------------------------- Registry.move

class FakeClient:
    """The MlflowClient calls Registry makes, in memory; fail_tag / fail_alias make the n-th
    write of that kind (1-based) raise."""

    def __init__(self, versions=("1", "2", "3"), aliases=None, fail_tag: int | None = None,
                 fail_alias: int | None = None):
        self.known = list(versions)
        self.alias_map = dict(aliases or {})
        self.tags: dict[str, str] = {}
        self.fail_tag, self.fail_alias = fail_tag, fail_alias
        self.tag_writes = self.alias_writes = 0

    def get_registered_model(self, name):
        return SimpleNamespace(name=name, aliases=dict(self.alias_map), tags=dict(self.tags))

    def search_model_versions(self, filter_string):
        return [SimpleNamespace(version=v, creation_timestamp=1000 * int(v), run_id=f"run{v}",
                                source=f"runs:/run{v}/model", tags={}) for v in self.known]

    def _alias_write(self):
        self.alias_writes += 1
        if self.alias_writes == self.fail_alias:
            raise RuntimeError("alias write refused")

    def set_registered_model_alias(self, name, alias, version):
        self._alias_write()
        self.alias_map[alias] = str(version)

    def delete_registered_model_alias(self, name, alias):
        self._alias_write()
        del self.alias_map[alias]

    def set_registered_model_tag(self, name, key, value):
        self.tag_writes += 1
        if self.tag_writes == self.fail_tag:
            raise RuntimeError("tag write refused: quota")
        self.tags[key] = value

    def delete_registered_model_tag(self, name, key):
        del self.tags[key]


BEFORE = {"champion": "1", "challenger": "2"}


@pytest.fixture
def ticking_clock(monkeypatch):
    """A registry clock one second per reading: each move gets its own stamp, as it does over a
    real network (a move makes several round trips before it stamps); in memory, two moves can
    fall in one millisecond, whose order the audit keys do not keep."""
    ticks = iter(range(1_700_000_000, 1_700_001_000))
    monkeypatch.setattr(registry, "time", SimpleNamespace(time=lambda: float(next(ticks)), strftime=time.strftime,
                                                          gmtime=time.gmtime))


@pytest.mark.parametrize("fail_tag", [1, 2])
def test_move_failing_audit_write_restores_aliases_and_writes_no_event(fail_tag):
    client = FakeClient(aliases=BEFORE, fail_tag=fail_tag)
    reg = Registry(client, "onerec")
    with pytest.raises(RegistryError, match="promote failed and was undone: tag write refused") as err:
        reg.promote(reason="A/B won")         # champion 1 -> 2 and challenger 2 -> deleted: two events
    assert "undone" in str(err.value)
    assert client.alias_map == BEFORE
    assert client.alias_writes == 4          # two moves, two restores
    assert client.tags == {}                 # no half-written trail either
    assert reg.audit_trail() == []


def test_move_failing_second_alias_write_restores_the_first():
    client = FakeClient(aliases=BEFORE, fail_alias=2)    # champion set, challenger delete refused
    reg = Registry(client, "onerec")
    with pytest.raises(RegistryError, match="undone: alias write refused"):
        reg.promote()
    assert client.alias_map == BEFORE
    assert client.tag_writes == 0 and client.tags == {}


def test_move_dry_run_changes_nothing():
    client = FakeClient(aliases=BEFORE)
    move = Registry(client, "onerec").promote(reason="A/B won", dry_run=True)
    assert not move.applied
    assert move.changes == (("champion", "1", "2"), ("challenger", "2", None))
    assert move.describe() == "promote: would move champion: 1 -> 2; challenger: 2 -> - (A/B won)"
    assert client.alias_map == BEFORE
    assert client.alias_writes == client.tag_writes == 0


def test_move_to_a_missing_version_raises_and_changes_nothing():
    client = FakeClient(aliases=BEFORE)
    reg = Registry(client, "onerec")
    with pytest.raises(RegistryError, match=r"has no version 9 \(versions: 3, 2, 1\)"):
        reg.move({"challenger": "3", "champion": "9"}, action="promote")
    with pytest.raises(RegistryError, match="has no version 7"):
        reg.promote("7")
    with pytest.raises(RegistryError, match="has no version 8"):
        reg.rollback(to="8", dry_run=True)
    assert client.alias_map == BEFORE
    assert client.alias_writes == client.tag_writes == 0


def test_move_records_one_event_per_change_in_the_order_given(monkeypatch):
    # the random part of the audit key must not decide the order within one move
    suffixes = iter(["ffffff", "000000"])
    monkeypatch.setattr(registry.secrets, "token_hex", lambda n: next(suffixes))
    client = FakeClient(aliases=BEFORE)
    reg = Registry(client, "onerec")
    move = reg.promote(reason="A/B won")
    assert move.applied and move.describe() == "promote: move champion: 1 -> 2; challenger: 2 -> - (A/B won)"
    assert client.alias_map == {"champion": "2"}
    trail = reg.audit_trail()
    assert [(e.action, e.alias, e.from_version, e.to_version, e.reason) for e in trail] == [
        ("promote", "champion", "1", "2", "A/B won"), ("promote", "challenger", "2", None, "A/B won")]
    assert all(e.who == trail[0].who != "" for e in trail)
    assert all(json.loads(v)["alias"] in ("champion", "challenger") for v in client.tags.values())


def test_move_names_the_actor_from_the_environment(monkeypatch, ticking_clock):
    monkeypatch.setenv(registry.ACTOR_ENV, "oncall-bob")
    client = FakeClient(aliases={"champion": "1"})
    reg = Registry(client, "onerec")
    reg.promote("3", reason="hotfix")
    reg.move({"challenger": "2"}, action="register-alias", who="pipeline")
    assert [(e.who, e.action, e.alias, e.to_version) for e in reg.audit_trail()] == [
        ("oncall-bob", "promote", "champion", "3"), ("pipeline", "register-alias", "challenger", "2")]


def test_audit_stamp_is_one_instant(monkeypatch):
    # a clock read twice across a second boundary must not produce a stamp a second early
    readings = iter([1_700_000_000.9999, 1_700_000_001.0001, 1_700_000_001.0002, 1_700_000_001.0003])
    fake_time = SimpleNamespace(time=lambda: next(readings), strftime=time.strftime,
                                gmtime=lambda secs=None: time.gmtime(next(readings) if secs is None else secs))
    monkeypatch.setattr(registry, "time", fake_time)
    client = FakeClient(aliases={"champion": "1"})
    reg = Registry(client, "onerec")
    reg.promote("2")
    (event,) = reg.audit_trail()
    assert event.when in ("2023-11-14T22:13:20.999Z", "2023-11-14T22:13:21.000Z")


def test_rollback_replays_the_trail_through_the_fake(ticking_clock):
    client = FakeClient(aliases={})
    reg = Registry(client, "onerec")
    reg.move({"champion": "1"}, action="register-alias", who="pipeline")
    reg.promote("2")
    reg.promote("3")
    assert reg.rollback().changes == (("champion", "3", "2"),)
    assert reg.rollback().changes == (("champion", "2", "1"),)
    with pytest.raises(RegistryError, match="no earlier champion"):
        reg.rollback()
    assert client.alias_map == {"champion": "1"}


# --------------------------------------------------------------------------- check_reachable

def test_check_reachable_closed_port_is_a_clear_error():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(RegistryError, match="unreachable") as err:
        check_reachable(uri, timeout_s=2)
    assert uri in str(err.value) and "onerec stack up" in str(err.value)
    assert time.monotonic() - start < 2


def test_check_reachable_accepts_a_server_that_answers_health():
    paths = []

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            paths.append(self.path)
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_port}/", timeout_s=2)
        assert paths == ["/health"]
    finally:
        server.shutdown()
        server.server_close()
    check_reachable("sqlite:///nowhere/mlflow.db")        # not HTTP: left to the client
