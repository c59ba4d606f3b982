"""The serving benchmark's keep-alive HTTP client (benchmarks/serving.py), against a real HTTP/1.1
server on loopback: statuses, bodies, one connection for many requests, reconnect after close."""
from __future__ import annotations

import importlib.util
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("serving_benchmark_under_test", ROOT / "benchmarks" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module                    # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def server():
    connections = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"                 # keep-alive

        def do_POST(self):  # noqa: N802 - http.server's name
            connections.append(self.client_address)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            user = body["instances"][0]["user_id"]
            status = 503 if user < 0 else 200
            out = json.dumps({"predictions": [{"items": list(range(body["instances"][0]["k"]))}]}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(out)))
            if user == 0:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", connections
    httpd.shutdown()
    httpd.server_close()


def test_keep_alive_client_reads_status_and_body_over_one_connection(bench, server):
    url, connections = server
    host, port = url.removeprefix("http://").rsplit(":", 1)
    client = bench.KeepAliveClient(host, int(port))
    for user in (1, 2, 3):
        status, body = client.post("/v1/models/m:predict", json.dumps({"instances": [{"user_id": user, "k": 4}]}).encode())
        assert status == 200 and json.loads(body)["predictions"][0]["items"] == [0, 1, 2, 3]
    assert len(set(connections)) == 1                 # one socket, kept alive
    client.close()


def test_http_caller_counts_k_items_as_ok_and_reconnects_after_a_close(bench, server, monkeypatch):
    url, connections = server
    monkeypatch.setattr(bench, "RETRY_AFTER_S", 0.0)
    call = bench.http_caller(url, "m", 5, concurrency=1)
    assert call(0, 7) is True
    assert call(0, 0) is True                          # the server closes after this answer
    assert call(0, 8) is True and len(set(connections)) == 2
    assert call(0, -1) is False                        # 503: an error for the benchmark
