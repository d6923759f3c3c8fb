"""Slow clients cannot stop the server (issue 14, item 3): a real ``infantino-server run``
(gunicorn, 2 workers x 8 threads = 16 threads) and 60 loopback connections that send their
request headers a line at a time, plus 20 that send a declared body a byte at a time. Health
and device updates must still answer within 1 s, and a slow connection is closed once it
has had its time."""
from __future__ import annotations

import socket
import threading
import time
import urllib.request
import uuid

import pytest

from infantino.edge_runtime.core import wire
from server_helpers import Server

SLOW_HEADERS = 60
SLOW_BODIES = 20
HEAD_TIMEOUT_S = 6


def slow_headers(port: int, stop: threading.Event, closed: list) -> None:
    """GET /v1/health, one header line every 0.5 s, for at most 60 lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for i in range(60):
            if stop.wait(0.5):
                return
            try:
                s.sendall(f"X-Slow-{i}: x\r\n".encode())
            except OSError:
                closed.append(time.monotonic())
                return


def slow_body(port: int, stop: threading.Event) -> None:
    """POST /v1/updates declaring 20 KB, then one byte every 0.5 s."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /v1/updates HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 20000\r\n"
                  b"Authorization: Bearer x\r\n\r\n")
        for _ in range(60):
            if stop.wait(0.5):
                return
            try:
                s.sendall(b"\0")
            except OSError:
                return


def timed(request: urllib.request.Request) -> tuple[int, float]:
    t0 = time.monotonic()
    with urllib.request.urlopen(request, timeout=5) as resp:
        resp.read()
        return resp.status, time.monotonic() - t0


@pytest.fixture
def server(tmp_path, tiny_package_dir):
    with Server(tmp_path, tiny_package_dir, env={"INFANTINO_HEAD_TIMEOUT_S": str(HEAD_TIMEOUT_S)}) as srv:
        yield srv


def test_health_and_updates_answer_within_a_second_while_60_clients_send_headers_slowly(server):
    # Prepare
    token = server.token("cam-fast")
    serving = server.store.serving()
    head = server.store.head(serving.head_version)
    stop = threading.Event()
    closed: list[float] = []
    threads = [threading.Thread(target=slow_headers, args=(server.process.port, stop, closed), daemon=True)
               for _ in range(SLOW_HEADERS)]
    threads += [threading.Thread(target=slow_body, args=(server.process.port, stop), daemon=True) for _ in range(SLOW_BODIES)]
    started = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(1.5)  # every slow connection is open and trickling
    # Execute
    health, updates = [], []
    try:
        for _ in range(5):
            health.append(timed(urllib.request.Request(f"{server.url}/v1/health")))
            body = wire.encode_update(device="cam-fast", base_head_version=serving.head_version,
                                      base_package_version=serving.package_version,
                                      layers=[a * 0 for a in head.layers], n_samples=1,
                                      idempotency_key=uuid.uuid4().hex, kind="delta")
            updates.append(timed(urllib.request.Request(f"{server.url}/v1/updates", data=body, method="POST",
                                                        headers={"Authorization": f"Bearer {token}",
                                                                 "Content-Type": wire.CONTENT_TYPE})))
            time.sleep(0.3)
        time.sleep(HEAD_TIMEOUT_S + 2 - (time.monotonic() - started))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    # Assert
    assert [s for s, _ in health] == [200] * 5 and [s for s, _ in updates] == [202] * 5
    assert max(dt for _, dt in health + updates) < 1.0, (health, updates)
    assert len(closed) >= SLOW_HEADERS * 0.9  # the server hung up on them after HEAD_TIMEOUT_S ...
    assert all(HEAD_TIMEOUT_S - 1 <= c - started <= HEAD_TIMEOUT_S + 2.5 for c in closed)  # ... not before
    assert server.store.counts() == {"buffered": 5}


def test_keep_alive_and_pipelined_requests_are_served(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.process.port, timeout=5)
    for pause in (0.0, 0.5, 1.5):  # the same connection, idle in the event loop in between
        time.sleep(pause)
        conn.request("GET", "/v1/health")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
    conn.close()
    with socket.create_connection(("127.0.0.1", server.process.port), timeout=5) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200") == 2
