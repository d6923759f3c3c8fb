"""``GET /metrics``: Prometheus text format (prometheus_client).

Two kinds of numbers, each from where it is true for the whole server:

* **events** (update answers by outcome and reason, request latency) happen in whichever
  gunicorn worker took the request; they are prometheus_client metrics, in multiprocess
  mode under ``infantino-server run`` (``infantino.sync_server.gunicorn_conf`` sets the folder), so
  any worker's scrape sums all workers;
* **state** (updates buffered/aggregated/refused, devices waiting, rounds, served head and
  package, MLflow outbox backlog and its last error) is read from the store at scrape time:
  one answer for every worker and every host, right after a restart too. The MLflow error
  disappears once the outbox is drained (recovery).
"""
from __future__ import annotations

import os
import time
from typing import Iterator, Optional

from flask import Flask, Response, abort, current_app, g, request
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import store as st

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text format every Prometheus reads
STATUS_REASONS = {401: "unauthorized", 403: "forbidden", 413: "too_large", 429: "too_many_waiting", 503: "busy"}


class Events:
    """This process's event metrics (written to the multiprocess folder when there is one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.updates = Counter("infantino_update_requests", "POST /v1/updates answers by outcome and refusal reason",
                               ["outcome", "reason"], registry=self.registry)
        self.package_mismatches = Counter("infantino_package_file_mismatches", "Package files found not to match their "
                                          "manifest sha256 (not served), per worker that noticed", ["file"], registry=self.registry)
        self.latency = Histogram("infantino_request_duration_seconds", "Request latency by endpoint",
                                 ["endpoint", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def exposition(self) -> bytes:
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not folder:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)
        return generate_latest(registry)


class StoreCollector:
    """The server's durable state as metric families, read at scrape time."""

    def __init__(self, store: st.Store, tracking: bool):
        self.store = store
        self.tracking = tracking

    def collect(self) -> Iterator[Metric]:
        view = self.store.metrics_view()
        yield _labelled(GaugeMetricFamily("infantino_updates", "Stored updates by status", labels=["status"]),
                        view["updates"])
        yield GaugeMetricFamily("infantino_buffered_updates", "Updates waiting for the next round", value=view["updates"].get("buffered", 0))
        yield GaugeMetricFamily("infantino_buffered_devices", "Devices with updates waiting (a round needs K)",
                                value=view["buffered_devices"])
        yield _labelled(CounterMetricFamily("infantino_rounds", "Aggregation rounds by head-gate decision", labels=["decision"]),
                        view["rounds"])
        yield _labelled(CounterMetricFamily("infantino_package_gate_decisions", "Package publish decisions", labels=["decision"]),
                        view["package_gates"])
        yield _labelled(GaugeMetricFamily("infantino_devices", "Device tokens by state", labels=["state"]), view["devices"])
        served = GaugeMetricFamily("infantino_served_head_version", "Global head version devices receive",
                                   labels=["package_version"])
        if view["serving"] is not None:
            served.add_metric([view["serving"][0]], view["serving"][1])
        yield served
        if self.tracking:
            yield from _tracking(view["outbox"])


def _labelled(family, values: dict):
    for label, value in sorted(values.items()):
        family.add_metric([str(label)], value)
    return family


def _tracking(outbox: dict) -> Iterator[Metric]:
    yield GaugeMetricFamily("infantino_tracking_outbox_pending", "Records waiting to be logged to MLflow",
                            value=outbox["pending"])
    age = 0.0 if outbox["oldest"] is None else max(0.0, time.time() - outbox["oldest"])
    yield GaugeMetricFamily("infantino_tracking_outbox_oldest_seconds", "Age of the oldest record waiting for MLflow", value=age)
    yield GaugeMetricFamily("infantino_tracking_outbox_dead", "Records set aside because they can never be logged (dead letters)",
                            value=outbox.get("dead", 0))
    error = GaugeMetricFamily("infantino_tracking_last_error", "1 while the oldest waiting record failed to log (its error)",
                              labels=["error"])
    if outbox["last_error"]:
        error.add_metric([outbox["last_error"].splitlines()[0][:200]], 1.0)
    yield error


def _observe(events: Events, response: Response) -> Response:
    started = g.pop("infantino_t0", None)
    endpoint = request.endpoint or "unmatched"
    if started is not None:
        events.latency.labels(endpoint, request.method).observe(time.perf_counter() - started)
    if endpoint == "v1.post_update":
        status = response.status_code
        if status == 202:
            events.updates.labels("accepted", "").inc()
        elif status == 200:
            events.updates.labels("duplicate", "").inc()
        else:
            reason = g.get("refusal") or STATUS_REASONS.get(status, str(status))
            events.updates.labels("refused", reason).inc()
    return response


def init_app(app: Flask, store: st.Store, tracking: bool, token: Optional[str] = None) -> Events:
    """Time every request, count update answers, serve ``GET /metrics`` (bearer ``token`` if given)."""
    events = Events()
    collector = CollectorRegistry(auto_describe=False)
    collector.register(StoreCollector(store, tracking))

    @app.before_request
    def _start_timer():
        g.infantino_t0 = time.perf_counter()

    @app.after_request
    def _count(response: Response) -> Response:
        return _observe(events, response)

    @app.get("/metrics")
    def metrics():
        if token and request.headers.get("Authorization", "") != f"Bearer {token}":
            abort(401, "GET /metrics needs the metrics token (INFANTINO_METRICS_TOKEN)")
        try:
            state = generate_latest(collector)
        except st.StoreBusy as exc:
            abort(503, str(exc))
        return current_app.response_class(events.exposition() + state, content_type=CONTENT_TYPE)

    return events
