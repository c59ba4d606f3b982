"""`onerec abtest report`, `rewards show` and `guardrail watch` over a seeded A/B store (no stack:
without MLflow the report has no model links, which is what these check too)."""
from __future__ import annotations

import json

import pytest

from onerec.abtest.scorecard import scorecard
from onerec.abtest.store import ABStore
from onerec.cli import main
from onerec.config import load_config
from onerec.endpoints import AB_STORE_FILE, AB_STORE_URL, ab_store_url
from tests.abtest_data import seed_experiment


@pytest.fixture
def state(tmp_path):
    store = ABStore.open(ab_store_url(tmp_path))           # the default: SQLite in the state dir
    seed_experiment(store, name="exp-cli", lift=0.1)
    store.close()
    return tmp_path


def _run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    capsys.readouterr()
    rc = main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return rc, json.loads(lines[-1]) if rc == 0 and lines else None, err


def test_the_store_defaults_to_sqlite_in_the_state_dir_and_the_env_wins(tmp_path, monkeypatch):
    assert ab_store_url(tmp_path) == f"sqlite:///{(tmp_path / AB_STORE_FILE).resolve()}"
    monkeypatch.setenv(AB_STORE_URL, "postgresql+psycopg://u@db/ab")
    assert ab_store_url(tmp_path) == "postgresql+psycopg://u@db/ab"


def test_abtest_report_prints_the_scorecard_as_its_last_line(state, capsys, tmp_path):
    rc, card, err = _run(capsys, "abtest", "report", "exp-cli", "--config", "debug", "--set",
                         f"stack.state_dir={state}", "--json", str(tmp_path / "card.json"))
    assert rc == 0 and "exp-cli: ship" in err
    expected = scorecard(ABStore(ab_store_url(state)), "exp-cli", load_config("debug").abtest,
                         weights={"control": 50.0, "treatment": 50.0}, now_ms=card["generated_ms"])
    for v in expected["variants"]:
        v["model_links"] = [{"version": m, "url": None} for m in v["model_versions"]]
    assert card == json.loads(json.dumps(expected)) == json.loads((tmp_path / "card.json").read_text())


def test_abtest_report_of_an_unknown_experiment_says_so(state, capsys):
    rc, _, err = _run(capsys, "abtest", "report", "nope", "--config", "debug", "--set", f"stack.state_dir={state}")
    assert rc == 2 and "experiment 'nope' has no exposures in the A/B store" in err


def test_rewards_show_lists_the_experiments(state, capsys):
    rc, shown, _ = _run(capsys, "rewards", "show", "--config", "debug", "--set", f"stack.state_dir={state}")
    assert rc == 0 and [e["name"] for e in shown["experiments"]] == ["exp-cli"] and shown["offline_rows"] == 0


def test_guardrail_watch_refuses_when_the_config_turns_it_off(state, capsys):
    rc, _, err = _run(capsys, "guardrail", "watch", "--once", "--config", "full", "--set", f"stack.state_dir={state}")
    assert rc == 2 and "abtest.watch" in err and "off" in err
