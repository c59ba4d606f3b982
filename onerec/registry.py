"""The MLflow model registry as the on-call engineer sees it: versions, aliases, promote, rollback.

    reg = Registry.connect(tracking_uri, "onerec")       # fails fast, clearly, if MLflow is down
    reg.versions()                                        # [ModelVersionInfo] newest first
    reg.register(run_id, "model", tags={...})             # -> "3"
    reg.move({"challenger": "3"}, action="register-alias", who="pipeline", reason="beat champion by 4 %")
    reg.promote(reason="A/B won")                         # challenger -> champion
    reg.rollback(reason="p99 regression")                 # champion -> the champion before it
    reg.audit_trail()                                     # [AuditEvent] oldest first

Aliases are the only state that says what serves: `champion` (the predictor's default) and
`challenger` (the candidate the retrain pipeline proposes). Every alias move is one `move`: it
checks everything first, sets or deletes the aliases, then appends an audit event, and if any
write fails it deletes the events and puts back the aliases it had written before raising, so a
failed command leaves the registry as it found it. The audit trail lives on the registered model
as tags `audit.<utc time>.<index><random>` (JSON: who, when, action, alias, from, to, why), so it
travels with the registry and needs no other store; the keys sort by time, then by the order of
the changes within one move.

Rollback's "previous champion" is replayed from the audit trail: a stack of champions where
promote and rollback --to push, and rollback pops the current one.
"""
from __future__ import annotations

import getpass
import json
import os
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

CHAMPION, CHALLENGER = "champion", "challenger"
AUDIT_PREFIX = "audit."
ACTOR_ENV = "ONEREC_ACTOR"          # who the audit trail names (default: the OS user)


class RegistryError(RuntimeError):
    """A registry command cannot be done; the registry is unchanged."""


@dataclass(frozen=True)
class ModelVersionInfo:
    version: str
    aliases: tuple[str, ...]
    created_ms: int
    run_id: str
    source: str
    tags: dict = field(default_factory=dict)

    def age_s(self, now: float | None = None) -> float:
        return (now if now is not None else time.time()) - self.created_ms / 1000


@dataclass(frozen=True)
class AuditEvent:
    when: str                 # UTC, ISO 8601
    who: str
    action: str               # register-alias | promote | rollback
    alias: str
    from_version: str | None  # what the alias pointed at before (None: it did not exist)
    to_version: str | None    # what it points at after (None: deleted)
    reason: str


@dataclass(frozen=True)
class AliasMove:
    """What a command does (or, with dry_run, would do)."""
    action: str
    changes: tuple[tuple[str, str | None, str | None], ...]   # (alias, from, to)
    reason: str
    applied: bool

    def describe(self) -> str:
        verb = "" if self.applied else "would "
        parts = [f"{alias}: {frm or '-'} -> {to or '-'}" for alias, frm, to in self.changes]
        return f"{self.action}: {verb}move {'; '.join(parts)}" + (f" ({self.reason})" if self.reason else "")


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Raise RegistryError unless an MLflow server answers at `tracking_uri` (http/https only:
    other URIs, e.g. a local sqlite store, are checked by the client itself)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=timeout_s) as resp:
            resp.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RegistryError(f"MLflow is unreachable at {tracking_uri} ({exc}); start it with "
                            "`onerec stack up` or export MLFLOW_TRACKING_URI") from None


def actor() -> str:
    return os.environ.get(ACTOR_ENV) or getpass.getuser()


class Registry:
    """One registered model in one MLflow registry."""

    def __init__(self, client, name: str):
        self.client, self.name = client, name

    @classmethod
    def connect(cls, tracking_uri: str, name: str) -> Registry:
        from mlflow.tracking import MlflowClient

        check_reachable(tracking_uri)
        return cls(MlflowClient(tracking_uri, registry_uri=tracking_uri), name)

    # -- reading
    def _lookup(self):
        """The registered model, or None when it does not exist (other failures: RegistryError)."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self.name)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise RegistryError(f"cannot read registered model '{self.name}': {exc.message}") from None

    def _model(self, create: bool = False):
        found = self._lookup()
        if found is not None:
            return found
        if not create:
            raise RegistryError(f"no registered model '{self.name}': run the retrain pipeline "
                                "(`onerec pipelines run retrain`) to register a first version")
        return self.client.create_registered_model(self.name)

    def exists(self) -> bool:
        return self._lookup() is not None

    def download(self, version: str, dst: str | Path) -> Path:
        """The version's model directory (weights, hparams, tokenizer) under dst -> its path."""
        import mlflow.artifacts

        mv = self.client.get_model_version(self.name, str(version))
        path = mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst),
                                                   tracking_uri=self.client.tracking_uri)
        return Path(path)

    def aliases(self) -> dict[str, str]:
        """alias -> version."""
        return {a: str(v) for a, v in (self._model().aliases or {}).items()}

    def versions(self) -> list[ModelVersionInfo]:
        """Every version, newest first, with its aliases."""
        self._model()
        by_version: dict[str, list[str]] = {}
        for alias, version in self.aliases().items():
            by_version.setdefault(version, []).append(alias)
        found = self.client.search_model_versions(f"name='{self.name}'")
        rows = [ModelVersionInfo(str(v.version), tuple(sorted(by_version.get(str(v.version), []))),
                                 int(v.creation_timestamp or 0), v.run_id or "", v.source or "",
                                 dict(v.tags or {})) for v in found]
        return sorted(rows, key=lambda r: int(r.version), reverse=True)

    def version(self, version: str) -> ModelVersionInfo:
        for row in self.versions():
            if row.version == str(version):
                return row
        known = ", ".join(r.version for r in self.versions()) or "none"
        raise RegistryError(f"model '{self.name}' has no version {version} (versions: {known})")

    def alias_version(self, alias: str) -> str | None:
        return self.aliases().get(alias)

    def audit_trail(self) -> list[AuditEvent]:
        tags = self._model().tags or {}
        events = [json.loads(v) for k, v in sorted(tags.items()) if k.startswith(AUDIT_PREFIX)]
        return [AuditEvent(**e) for e in events]

    # -- writing
    def register(self, run_id: str, artifact_path: str, tags: dict[str, str] | None = None) -> str:
        """A new version from run `run_id`'s artifacts at `artifact_path` -> its version number."""
        self._model(create=True)
        mv = self.client.create_model_version(self.name, f"runs:/{run_id}/{artifact_path}", run_id=run_id,
                                              tags={k: str(v) for k, v in (tags or {}).items()})
        return str(mv.version)

    def move(self, changes: dict[str, str | None], *, action: str, reason: str = "", who: str | None = None,
             dry_run: bool = False) -> AliasMove:
        """Point each alias at its version (None = delete it), then record one audit event per
        changed alias. All or nothing: a failed write restores the aliases already changed."""
        current = self.aliases()
        for version in {v for v in changes.values() if v is not None}:
            self.version(version)                                     # raises if missing
        planned = tuple((alias, current.get(alias), to) for alias, to in changes.items()
                        if current.get(alias) != to)
        move = AliasMove(action, planned, reason, applied=not dry_run)
        if dry_run or not planned:
            return move
        done: list[tuple[str, str | None]] = []
        written: list[str] = []
        try:
            for alias, before, to in planned:
                self._set_alias(alias, to)
                done.append((alias, before))
            now = time.time()   # one reading: seconds and milliseconds of the same instant
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
            for i, (alias, before, to) in enumerate(planned):
                event = AuditEvent(stamp, who or actor(), action, alias, before, to, reason)
                # the index keeps one move's events in the order planned (the random part does not)
                key = f"{AUDIT_PREFIX}{stamp}.{i:02d}{secrets.token_hex(3)}"
                self.client.set_registered_model_tag(self.name, key, json.dumps(asdict(event)))
                written.append(key)
        except Exception as exc:
            for key in reversed(written):
                try:
                    self.client.delete_registered_model_tag(self.name, key)
                except Exception:  # noqa: BLE001 - report the first failure, not the cleanup's
                    pass
            for alias, before in reversed(done):
                try:
                    self._set_alias(alias, before)
                except Exception:  # noqa: BLE001 - report the first failure, not the cleanup's
                    pass
            raise RegistryError(f"{action} failed and was undone: {exc}") from None
        return move

    def _set_alias(self, alias: str, version: str | None) -> None:
        if version is None:
            self.client.delete_registered_model_alias(self.name, alias)
        else:
            self.client.set_registered_model_alias(self.name, alias, version)

    # -- the on-call commands
    def promote(self, version: str | None = None, *, reason: str = "", dry_run: bool = False,
                who: str | None = None) -> AliasMove:
        """champion := `version` (default: the challenger); the challenger alias is cleared when it
        was the one promoted."""
        aliases = self.aliases()
        target = str(version) if version is not None else aliases.get(CHALLENGER)
        if target is None:
            raise RegistryError(f"model '{self.name}' has no '{CHALLENGER}' to promote; name a version "
                                "(`onerec model promote VERSION`)")
        if aliases.get(CHAMPION) == target:
            raise RegistryError(f"version {target} is already the {CHAMPION}")
        changes: dict[str, str | None] = {CHAMPION: target}
        if aliases.get(CHALLENGER) == target:
            changes[CHALLENGER] = None
        return self.move(changes, action="promote", reason=reason, who=who, dry_run=dry_run)

    def rollback(self, to: str | None = None, *, reason: str = "", dry_run: bool = False,
                 who: str | None = None) -> AliasMove:
        """champion := `to` (default: the champion before the current one, from the audit trail)."""
        current = self.alias_version(CHAMPION)
        if current is None:
            raise RegistryError(f"model '{self.name}' has no '{CHAMPION}' to roll back")
        if to is None:
            history = champion_history(self.audit_trail())
            if len(history) < 2 or history[-1] != current:
                raise RegistryError(f"no earlier {CHAMPION} of '{self.name}' is on record; roll back to a "
                                    "named version with --to VERSION")
            to = history[-2]
        if str(to) == current:
            raise RegistryError(f"version {to} is already the {CHAMPION}")
        return self.move({CHAMPION: str(to)}, action="rollback", reason=reason, who=who, dry_run=dry_run)


def format_versions(rows: list[ModelVersionInfo], metric: str, now: float | None = None) -> str:
    """The `onerec model list` table: version, aliases, the key test metrics, age, snapshot."""
    from onerec.model.train import metric_name

    metrics = [metric, *(m for m in ("recall@10", "ndcg@10") if m != metric)]
    head = ["version", "aliases", *metrics, "age", "snapshot", "beats champion"]
    table = [head]
    for r in rows:
        values = [r.tags.get(metric_name(f"test_{m}"), "-") for m in metrics]
        table.append([r.version, ",".join(r.aliases) or "-", *values, _age(r.age_s(now)),
                      r.tags.get("data_snapshot", "-"), r.tags.get("beats_champion", "-")])
    if len(table) == 1:
        return "no versions registered"
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in table)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def champion_history(events: list[AuditEvent]) -> list[str]:
    """The champions in force, oldest first: promote (and a first champion) and rollback --to push
    the new version; a rollback to the version just below the top pops the top."""
    stack: list[str] = []
    for e in events:
        if e.alias != CHAMPION or e.to_version is None:
            continue
        if e.action == "rollback" and len(stack) >= 2 and stack[-2] == e.to_version:
            stack.pop()
        else:
            stack.append(e.to_version)
    return stack
