"""The closed loop, `make demo`'s second half: the champion serves simulated users over HTTP,
their reactions become rewards, the align pipeline turns them into a challenger, an A/B test
splits users 50/50, the challenger is promoted if the scorecard says ship (onerec/abtest/), the
automatic guardrail watches the champion from then on, and a rollback drill checks that on-call
can undo a model within seconds.

    figures = closed_loop(cfg, preset, overrides, progress)

Every name carries a fresh run tag (the A/B file, the experiment salt, the variant names), so a
demo run again on the same stack never mixes its A/B arms with an earlier run's. The predictor is
the real server (`python -m serving`, serving/process.py) with a 1 s alias poll; the A/B file is
rewritten in place and picked up without a restart.
"""
from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import yaml

from onerec.config import Config
from onerec.endpoints import KAFKA_BOOTSTRAP, MLFLOW_TRACKING_URI, REDIS_URL, ab_store_url, resolve_endpoints

SWITCH_TIMEOUT_S = 60.0       # a model swap the predictor must show within this


def write_ab(path: Path, experiment: str, variants: list[tuple[str, str, float]]) -> None:
    """The A/B file the predictor rereads: variants (name, registry alias, weight)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"experiment": experiment, "variants": [
        {"name": n, "alias": a, "weight": w} for n, a, w in variants]}, sort_keys=False))
    tmp.replace(path)                                  # readers never see half a file


def wait_for_version(recommend: Callable, user: int, version: str, timeout_s: float = SWITCH_TIMEOUT_S) -> float:
    """Ask for `user` until the answer comes from model `version` -> seconds it took."""
    start = time.monotonic()
    while True:
        answer = recommend(user, 1, f"probe-{uuid.uuid4().hex[:8]}")
        if answer["model_version"] == version:
            return round(time.monotonic() - start, 2)
        if time.monotonic() - start > timeout_s:
            raise TimeoutError(f"user {user} still served by v{answer['model_version']} after {timeout_s:.0f} s "
                               f"(waiting for v{version})")
        time.sleep(0.2)


def closed_loop(cfg: Config, preset: str, overrides: list[str], progress: Callable[[str], None]) -> dict:
    from onerec.abtest.dashboard import register_ab_file
    from onerec.abtest.guardrail import GuardrailWatcher
    from onerec.abtest.scorecard import scorecard
    from onerec.abtest.store import ABStore
    from onerec.pipelines import run_local
    from onerec.registry import CHAMPION, Registry, RegistryError
    from onerec.serve import ABConfig
    from onerec.simulate import fit_population, http_recommender, simulate
    from onerec.stream.rewards import RewardJoiner
    from serving.process import ServerProcess

    endpoints = resolve_endpoints(cfg.stack.state_dir)
    uri, bootstrap = endpoints.require(MLFLOW_TRACKING_URI), endpoints.require(KAFKA_BOOTSTRAP)
    store = ABStore.open(ab_store_url(cfg.stack.state_dir))
    reg = Registry.connect(uri, cfg.registry.model_name)
    state = Path(cfg.stack.state_dir).resolve()
    tag = uuid.uuid4().hex[:6]
    ab_file, experiment = state / f"ab-{tag}.yaml", f"demo-{tag}"
    control, treatment = f"champion-{tag}", f"challenger-{tag}"
    write_ab(ab_file, f"{experiment}-feedback", [(f"feedback-{tag}", CHAMPION, 1.0)])   # before the A/B test
    figures: dict = {"ab_experiment": experiment}
    champion = reg.alias_version(CHAMPION)

    def join() -> dict:
        return RewardJoiner(cfg, bootstrap, store).run(idle_exit_s=5)

    args = ["--preset", preset, *(f"--set={o}" for o in overrides), f"--set=stack.state_dir={state}",
            f"--set=serving.ab_config={ab_file}", "--set=serving.reload_poll_s=1"]
    env = {**os.environ, MLFLOW_TRACKING_URI: uri, REDIS_URL: endpoints.require(REDIS_URL), KAFKA_BOOTSTRAP: bootstrap}
    with ServerProcess(args, env, state / "logs" / f"predictor-{tag}.log", cfg.registry.model_name) as server:
        recommend = http_recommender(server.url, cfg.registry.model_name, log_exposure=False)   # probes
        progress(f"  the champion v{champion} serves simulated users over HTTP ({server.url})")
        population = fit_population(cfg)                          # both rounds: the same simulated users
        before = simulate(cfg, server.url, bootstrap, population=population)
        figures.update({f"feedback_{k}": before[k] for k in ("requests", "request_errors", "reactions",
                                                             "real_share", "response_auc", "popularity_auc")})
        figures.update({f"feedback_join_{k}": v for k, v in join().items()})

        progress("  align pipeline (kfp.local): reward model on the joined rows -> ECPO -> challenger")
        aligned = run_local(cfg, "align", preset, overrides)
        challenger = aligned["version"]
        figures.update(align_version=challenger, align_seconds=aligned["seconds"])

        progress(f"  A/B: {control} (v{champion}) vs {treatment} (v{challenger}), 50/50 by user")
        write_ab(ab_file, experiment, [(control, CHAMPION, 50.0), (treatment, "challenger", 50.0)])
        register_ab_file(store, ab_file)                          # the scorecard's SRM check needs the weights
        split = ABConfig.parse(yaml.safe_load(ab_file.read_text()), str(ab_file))
        probe = {v: next(u for u in range(1, 10**6) if split.assign(u).name == v) for v in (control, treatment)}
        figures["ab_challenger_loaded_s"] = wait_for_version(recommend, probe[treatment], challenger)
        during = simulate(cfg, server.url, bootstrap, population=population)
        figures.update({f"ab_{k}": during[k] for k in ("requests", "request_errors", "reactions", "by_variant")})
        figures.update({f"ab_join_{k}": v for k, v in join().items() if k in ("rows", "matched", "late", "unmatched")})
        card = scorecard(store, experiment, cfg.abtest, weights={control: 50.0, treatment: 50.0})
        figures["ab"] = ab_summary(card)
        figures["ab_decision"] = decision = card["decision"]
        if decision == "ship":
            reg.promote(challenger, reason=f"A/B {experiment}: {card['decision_reason']}")
            figures["promoted_serving_s"] = wait_for_version(recommend, probe[control], challenger)
            if cfg.abtest.watch:
                progress("  the guardrail watches the new champion on fresh traffic")
                watcher = GuardrailWatcher(cfg.abtest, reg, store, f"{server.url}/metrics")   # sees the promotion
                figures["guardrail_start"] = watcher.check()["state"]
                one_round = dataclasses.replace(cfg, simulate=dataclasses.replace(cfg.simulate, sessions_per_user=1))
                simulate(one_round, server.url, bootstrap, population=population)
                join()
                figures["guardrail"] = watcher.check()
        figures["champion_after_ab"] = reg.alias_version(CHAMPION)

        progress("  rollback drill: `onerec model rollback`, then restore")
        current = reg.alias_version(CHAMPION)
        try:
            moved = reg.rollback(reason="demo rollback drill")
        except RegistryError as exc:
            figures["rollback_drill"] = f"skipped: {exc}"
        else:
            previous = next(to for alias, _, to in moved.changes if alias == CHAMPION)
            figures["rollback_serving_s"] = wait_for_version(recommend, probe[control], previous)
            reg.rollback(to=current, reason="demo rollback drill over")
            figures["rollback_restored_s"] = wait_for_version(recommend, probe[control], current)
            figures["rollback_drill"] = f"v{current} -> v{previous} -> v{current}"
    return figures


def ab_summary(card: dict) -> dict:
    """The scorecard's headline, for the demo's figures: the primary lift, health, decision."""
    comp = card["comparisons"][0] if card["comparisons"] else {}
    primary = comp.get("primary", {})
    return {"experiment": card["experiment"], "decision": card["decision"], "reason": card["decision_reason"],
            "users": {v["name"]: v["users"] for v in card["variants"]},
            "exposures": {v["name"]: v["exposures"] for v in card["variants"]},
            **{k: primary.get(k) for k in ("metric_control", "metric_treatment", "diff", "diff_low", "diff_high",
                                           "rel", "p_value")},
            "cuped_variance_reduction": comp.get("cuped", {}).get("variance_reduction"),
            "always_valid_p": comp.get("always_valid_p"), "srm_p": card["health"]["srm"].get("p_value"),
            "healthy": card["health"]["ok"]}
