"""The model registry against a real MLflow server of the embedded stack, through `onerec model`.

One stack for the module; every test registers its own model (a uuid name), so tests share
nothing but the server.
"""
from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from datetime import UTC, datetime

import pytest

from onerec import stack
from onerec.cli import main
from onerec.endpoints import ENV_FILE_NAME, read_env_file
from onerec.registry import ACTOR_ENV, Registry
from tests.conftest import free_port, stack_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    cfg = stack_config(tmp_path_factory.mktemp("state"))
    try:
        stack.up(cfg)
        # the env file, not resolve_endpoints: module fixtures run before the per-test fixture that
        # clears endpoint variables an earlier test (mlflow.set_tracking_uri) may have exported
        uri = read_env_file(Path(cfg.stack.state_dir) / ENV_FILE_NAME)["MLFLOW_TRACKING_URI"]
        assert uri == f"http://127.0.0.1:{cfg.stack.mlflow_port}"
        from mlflow import MlflowClient
        experiment_id = MlflowClient(uri).create_experiment(f"registry-test-{uuid.uuid4().hex[:8]}")
        yield cfg, uri, experiment_id
    finally:
        stack.down(cfg)


class Model:
    """One registered model of this test, and the CLI pointed at it."""

    def __init__(self, server, tmp_path):
        self.cfg, self.uri, self.experiment_id = server
        self.name = f"onerec-test-{uuid.uuid4().hex[:10]}"
        self.reg = Registry.connect(self.uri, self.name)
        self.tmp_path = tmp_path

    def add_version(self, **tags) -> str:
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        run = client.create_run(self.experiment_id)
        model_dir = self.tmp_path / f"model-{run.info.run_id}"
        model_dir.mkdir()
        (model_dir / "hparams.json").write_text('{"d_model": 8}')
        client.log_artifacts(run.info.run_id, str(model_dir), "model")
        client.set_terminated(run.info.run_id)
        return self.reg.register(run.info.run_id, "model", tags=tags)

    def args(self) -> list[str]:
        return ["--config", "debug", "--set", f"stack.state_dir={self.cfg.stack.state_dir}",
                "--set", f"stack.mlflow_port={self.cfg.stack.mlflow_port}",
                "--set", f"registry.model_name={self.name}"]

    def cli(self, capsys, *argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main(["model", *argv, *self.args()])
        out, err = capsys.readouterr()
        return rc, out, err

    def state(self):
        return self.reg.aliases(), self.reg.audit_trail()

    def trail(self) -> list[tuple]:
        return [(e.action, e.alias, e.from_version, e.to_version) for e in self.reg.audit_trail()]


@pytest.fixture
def model(mlflow_server, tmp_path) -> Model:
    return Model(mlflow_server, tmp_path)


def test_promote_moves_champion_to_the_challenger_and_audits_it(model, capsys, monkeypatch):
    v1, v2 = model.add_version(), model.add_version()
    assert (v1, v2) == ("1", "2")
    model.reg.move({"champion": v1, "challenger": v1}, action="register-alias", who="pipeline")
    model.reg.move({"challenger": v2}, action="register-alias", who="pipeline", reason="beat v1")
    assert model.reg.aliases() == {"champion": "1", "challenger": "2"}

    monkeypatch.setenv(ACTOR_ENV, "oncall-alice")
    rc, out, err = model.cli(capsys, "promote", "--reason", "A/B test won")
    assert (rc, err) == (0, "")
    assert out.strip() == "promote: move champion: 1 -> 2; challenger: 2 -> - (A/B test won)"
    assert model.reg.aliases() == {"champion": "2"}
    assert [r.aliases for r in model.reg.versions()] == [("champion",), ()]

    trail = model.reg.audit_trail()
    assert len(trail) == 5       # champion + challenger, challenger, then the promote's two
    champion_ev, challenger_ev = trail[-2:]
    assert (champion_ev.who, champion_ev.action, champion_ev.alias, champion_ev.from_version,
            champion_ev.to_version, champion_ev.reason) == ("oncall-alice", "promote", "champion", "1", "2",
                                                            "A/B test won")
    assert (challenger_ev.who, challenger_ev.action, challenger_ev.alias, challenger_ev.from_version,
            challenger_ev.to_version) == ("oncall-alice", "promote", "challenger", "2", None)
    when = datetime.strptime(champion_ev.when, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60
    assert [e.who for e in trail[:3]] == ["pipeline"] * 3


def test_rollback_goes_back_through_the_champions_on_record(model, capsys):
    v1, v2, v3 = (model.add_version() for _ in range(3))
    model.reg.move({"champion": v1}, action="register-alias", who="pipeline")

    assert model.cli(capsys, "promote", v2)[0] == 0
    rc, out, _ = model.cli(capsys, "rollback", "--reason", "p99 regression")
    assert rc == 0 and out.strip() == "rollback: move champion: 2 -> 1 (p99 regression)"
    assert model.reg.alias_version("champion") == "1"

    # a second promote (of the challenger this time) and rollback
    model.reg.move({"challenger": v3}, action="register-alias", who="pipeline")
    assert model.cli(capsys, "promote")[0] == 0
    assert model.reg.aliases() == {"champion": "3"}
    assert model.cli(capsys, "rollback")[0] == 0
    assert model.reg.aliases() == {"champion": "1"}

    # --to a named version, then a plain rollback returns to the champion before it
    rc, out, _ = model.cli(capsys, "rollback", "--to", v2)
    assert rc == 0 and out.strip() == "rollback: move champion: 1 -> 2"
    assert model.reg.alias_version("champion") == "2"
    assert model.cli(capsys, "rollback")[0] == 0
    assert model.reg.alias_version("champion") == "1"

    assert model.trail() == [
        ("register-alias", "champion", None, "1"),
        ("promote", "champion", "1", "2"),
        ("rollback", "champion", "2", "1"),
        ("register-alias", "challenger", None, "3"),
        ("promote", "champion", "1", "3"),
        ("promote", "challenger", "3", None),
        ("rollback", "champion", "3", "1"),
        ("rollback", "champion", "1", "2"),
        ("rollback", "champion", "2", "1"),
    ]
    assert model.reg.audit_trail()[2].reason == "p99 regression"


def test_dry_run_says_what_would_change_and_changes_nothing(model, capsys):
    v1, v2 = model.add_version(), model.add_version()
    model.reg.move({"champion": v1}, action="register-alias", who="pipeline")
    model.reg.move({"challenger": v2}, action="register-alias", who="pipeline")
    before = model.state()

    rc, out, _ = model.cli(capsys, "promote", "--dry-run", "--reason", "try")
    assert rc == 0 and out.strip() == "promote: would move champion: 1 -> 2; challenger: 2 -> - (try)"
    rc, out, _ = model.cli(capsys, "rollback", "--to", v2, "--dry-run")
    assert rc == 0 and out.strip() == "rollback: would move champion: 1 -> 2"
    assert model.state() == before

    assert model.cli(capsys, "promote")[0] == 0
    after_promote = model.state()
    rc, out, _ = model.cli(capsys, "rollback", "--dry-run")
    assert rc == 0 and out.strip() == "rollback: would move champion: 2 -> 1"
    assert model.state() == after_promote


def test_refused_commands_leave_the_registry_unchanged(model, mlflow_server, tmp_path, capsys):
    v1 = model.add_version()
    model.add_version()

    # no champion yet (and no challenger)
    before = model.state()
    assert before == ({}, [])
    for argv, message in [(["rollback"], f"model '{model.name}' has no 'champion' to roll back"),
                          (["promote"], f"model '{model.name}' has no 'challenger' to promote")]:
        rc, out, err = model.cli(capsys, *argv)
        assert (rc, out) == (1, ""), argv
        assert err.strip().startswith("error: ") and message in err, argv
        assert model.state() == before

    model.reg.move({"champion": v1}, action="register-alias", who="pipeline")
    before = model.state()
    for argv, message in [
        (["promote", "7"], f"model '{model.name}' has no version 7 (versions: 2, 1)"),
        (["promote", v1], "version 1 is already the champion"),
        (["rollback"], f"no earlier champion of '{model.name}' is on record"),
        (["rollback", "--to", v1], "version 1 is already the champion"),
        (["rollback", "--to", "9"], "has no version 9"),
    ]:
        rc, out, err = model.cli(capsys, *argv)
        assert (rc, out) == (1, ""), argv
        assert err.strip().startswith("error: ") and message in err, (argv, err)
        assert model.state() == before, argv

    # a model that was never registered
    other = Model(mlflow_server, tmp_path)
    rc, _, err = other.cli(capsys, "promote", "1")
    assert rc == 1 and f"no registered model '{other.name}'" in err
    assert not other.reg.exists()


def test_model_list_prints_versions_aliases_and_the_audit_trail(model, capsys, monkeypatch):
    rc, out, err = model.cli(capsys, "list")
    assert (rc, out) == (1, "") and f"no registered model '{model.name}'" in err
    from mlflow import MlflowClient
    MlflowClient(model.uri).create_registered_model(model.name)
    rc, out, _ = model.cli(capsys, "list")
    assert (rc, out.strip()) == (0, "no versions registered")
    v1 = model.add_version(test_ndcg_at_10="0.0750", test_recall_at_10="0.1300", data_snapshot="2024-01-01")
    v2 = model.add_version(test_ndcg_at_10="0.0800")
    v3 = model.add_version(test_ndcg_at_10="0.0912", test_recall_at_10="0.1501", beats_champion="true")
    model.reg.move({"champion": v1}, action="register-alias", who="pipeline", reason="first")
    model.reg.move({"challenger": v3}, action="register-alias", who="pipeline", reason="beat v1")
    monkeypatch.setenv(ACTOR_ENV, "oncall-bob")
    assert model.cli(capsys, "promote", v2, "--reason", "hotfix")[0] == 0

    rc, out, _ = model.cli(capsys, "list")
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].split()[:5] == ["version", "aliases", "ndcg@10", "recall@10", "age"]
    rows = [line.split() for line in lines[1:]]
    assert [r[:4] for r in rows] == [["3", "challenger", "0.0912", "0.1501"], ["2", "champion", "0.0800", "-"],
                                     ["1", "-", "0.0750", "0.1300"]]
    assert all(re.fullmatch(r"\d+[smhd]", r[4]) for r in rows)
    assert rows[0][-1] == "true" and rows[2][5] == "2024-01-01"
    assert "register-alias" not in out           # no audit without --audit

    rc, out, _ = model.cli(capsys, "list", "--audit")
    assert rc == 0
    audit = out.strip().splitlines()[4:]
    assert [line.split()[1:] for line in audit] == [
        ["pipeline", "register-alias", "champion", "-", "->", "1", "first"],
        ["pipeline", "register-alias", "challenger", "-", "->", "3", "beat", "v1"],
        ["oncall-bob", "promote", "champion", "1", "->", "2", "hotfix"],
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line.split()[0]) for line in audit)


def test_mlflow_unreachable_fails_fast_and_clearly(model, capsys, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed)        # wins over the stack's env file
    for argv in (["list"], ["promote", "1"], ["rollback", "--dry-run"]):
        start = time.monotonic()
        rc, out, err = model.cli(capsys, *argv)
        assert time.monotonic() - start < 5, argv
        assert (rc, out) == (1, ""), argv
        assert "unreachable" in err and closed in err, argv


def test_the_guardrail_rolls_a_slow_new_champion_back_with_the_reason_on_record(model, capsys, monkeypatch,
                                                                                 tmp_path):
    """`onerec guardrail watch --once` against the real registry: v2 was promoted, then served
    slowly (the A/B store says so); the watcher rolls the champion back to v1 and audits why."""
    import json

    from onerec.abtest.guardrail import audit_ms
    from onerec.abtest.store import ABStore
    from onerec.endpoints import AB_STORE_URL

    v1, v2 = model.add_version(), model.add_version()
    model.reg.promote(v1, reason="first")
    model.reg.promote(v2, reason="A/B won")
    promoted_ms = audit_ms(model.reg.audit_trail()[-1].when)
    url = f"sqlite:///{tmp_path / 'ab.db'}"
    store = ABStore.open(url)
    store.add_exposures([{"request_id": f"r{i}", "experiment": None, "variant": "control", "model_version": v2,
                          "user_id": i % 20, "fallback": None, "served_ms": promoted_ms + i, "items": [1, 2],
                          "rewards": [1.0, None], "reward": 1.0, "reacted": 1, "latency_ms": 900.0}
                         for i in range(60)])
    monkeypatch.setenv(AB_STORE_URL, url)
    capsys.readouterr()
    assert main(["guardrail", "watch", "--once", *model.args(), "--set", "abtest.watch=true"]) == 0
    look = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert look["state"] == "rolled_back" and look["champion"] == v1 and look["version"] == v2
    assert model.reg.alias_version("champion") == v1
    last = model.reg.audit_trail()[-1]
    assert (last.action, last.from_version, last.to_version, last.who) == ("rollback", v2, v1, "guardrail-watcher")
    assert "p99 latency 900 ms > 250 ms" in last.reason
    # the next look: the rollback starts no watch
    assert main(["guardrail", "watch", "--once", *model.args(), "--set", "abtest.watch=true"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"state": "idle", "champion": v1}
