"""Sync-server benchmark: update ingest from concurrent devices, and aggregation time.

    python bench/bench_server.py [--package data/models] [--devices 8 32 128] [--seconds 10]
                                 [--agg-sizes 10 100 1000 10000] [--pg-url postgresql+psycopg2://...]
                                 [--out bench/results/server.json] [--quick]

1. Ingest: a real ``infantino-server run`` (gunicorn, 2 gthread workers, SQLite with
   ``synchronous=FULL``) on 127.0.0.1; for each ``--devices`` count, that many simulated
   devices (threads in ``--client-procs`` processes) POST npz head updates (the release
   head's shape: 64 -> 64 -> 7, 4,615 float32) as fast as the server acknowledges them.
   Every acknowledged update is durable; the count is checked in the store afterwards.
2. Aggregation: 10 / 100 / 1,000 / 10,000 buffered updates in the store, one ``aggregate_once``
   (read the deltas, combine, write the head, mark the updates) for each rule.

Prints a table and writes JSON. Loopback only.
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

def find_package(arg: str | None) -> Path | None:
    if arg:
        return Path(arg)
    for manifest in sorted((REPO / "data" / "models").glob("*/manifest.json")):
        return manifest.parent
    if (REPO / "data" / "models" / "manifest.json").exists():
        return REPO / "data" / "models"
    return None


def synthetic_package(folder: Path) -> Path:
    """A package with the release head's shape (64-d embedding, 64 hidden, 7 classes)."""
    from infantino.edge_runtime.core.head import HeadParams, OnlineHead
    from infantino.edge_runtime.core.package import Manifest, describe_files, write_manifest
    from infantino.edge_runtime.core.preprocess import DEFAULT_SPEC
    from infantino.export.tiny_package import linear_extractor

    folder.mkdir(parents=True, exist_ok=True)
    linear_extractor(folder / "extractor.onnx", embed_dim=64)
    rng = np.random.default_rng(0)
    OnlineHead.fit(rng.normal(size=(140, 64)).astype(np.float32), np.arange(140) % 7, HeadParams(), max_iter=20).save(folder / "head.npz")
    write_manifest(folder, Manifest(version="bench-synthetic-1", preprocess=DEFAULT_SPEC, embedding_dim=64,
                                    files=describe_files(folder), model={"arch": "linear"}))
    return folder


# --------------------------------------------------------------------------- ingest


def _device_proc(args):
    """One process driving several device threads; returns latencies and outcomes."""
    import threading

    from infantino.edge_runtime.core import wire

    port, tokens, info, layers, seconds, start_at, keepalive = args
    results = []
    lock = threading.Lock()

    def run(name, token):
        rng = np.random.default_rng(abs(hash(name)) % 2**32)
        variants = [[a + rng.normal(0, 0.01, a.shape).astype(np.float32) for a in layers] for _ in range(4)]
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": wire.CONTENT_TYPE}
        lat, ok, bad = [], 0, 0
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        i = 0
        while time.time() < end:
            body = wire.encode_update(device=name, base_head_version=info["head_version"],
                                      base_package_version=info["package_version"], layers=variants[i % 4],
                                      n_samples=8, idempotency_key=uuid.uuid4().hex, metrics={"accuracy": 0.5})
            t = time.perf_counter()
            try:
                conn.request("POST", "/v1/updates", body=body, headers=headers)
                resp = conn.getresponse()
                resp.read()
                if resp.status == 202:
                    ok += 1
                else:
                    bad += 1
            except (OSError, http.client.HTTPException):
                bad += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            lat.append(time.perf_counter() - t)
            i += 1
            if not keepalive:  # like the device client (urllib): one connection per request
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        with lock:
            results.append((ok, bad, lat))

    threads = [threading.Thread(target=run, args=nt) for nt in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _tree_cpu(pid: int) -> np.ndarray:
    """(user, system) CPU seconds of a process and its children."""
    import psutil

    total = np.zeros(2)
    proc = psutil.Process(pid)
    for p in [proc] + proc.children(recursive=True):
        try:
            t = p.cpu_times()
            total += (t.user, t.system)
        except psutil.Error:
            pass
    return total


def bench_ingest(package: Path, devices: int, seconds: float, workers: int, threads: int, procs: int, work: Path,
                 pg_url: str | None = None, keepalive: bool = False) -> dict:
    import contextlib

    from infantino.sync_server.process import scratch_schema_url
    from infantino.sync_server import store as st

    data = work / ("ingest-pg" if pg_url else "ingest")
    data.mkdir(parents=True)
    with (scratch_schema_url(pg_url) if pg_url else contextlib.nullcontext(st.sqlite_url(data / "server.db"))) as url:
        return _bench_ingest(package, devices, seconds, workers, threads, procs, data, url, "postgresql" if pg_url else "sqlite",
                             keepalive)


def _bench_ingest(package, devices, seconds, workers, threads, procs, data, url, label, keepalive) -> dict:
    from infantino.edge_runtime.core.head import OnlineHead
    from infantino.sync_server.process import ServerProcess, cli, served_store
    from infantino.sync_server import store as st

    store = served_store(url, data, package)
    tokens = [(f"bench-{i:03d}", store.add_client(f"bench-{i:03d}")) for i in range(devices)]
    store.dispose()
    # No round ever runs here, so the cap on one device's waiting updates (429 past 64) is lifted:
    # this measures how fast updates are made durable, not the back-pressure.
    server = ServerProcess(data, db_url=url, workers=workers, threads=threads, aggregate_k=10**9,
                           env={"INFANTINO_MAX_BUFFERED_PER_DEVICE": str(10**9)})
    with server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port)
        conn.request("GET", "/v1/model", headers={"Authorization": f"Bearer {tokens[0][1]}"})
        info = json.loads(conn.getresponse().read())
        conn.request("GET", info["files"]["global_head"]["url"], headers={"Authorization": f"Bearer {tokens[0][1]}"})
        head = OnlineHead.from_bytes(conn.getresponse().read())
        conn.close()
        layers = [np.asarray(a, np.float32) for a in head.weights()]
        body_bytes = len(__import__("infantino.edge_runtime.core.wire", fromlist=["x"]).encode_update(
            device="x", base_head_version=1, base_package_version="x", layers=layers, n_samples=1, idempotency_key="k" * 32))
        start_at = time.time() + 3.0
        groups = [tokens[i::procs] for i in range(procs)]
        with mp.get_context("spawn").Pool(procs) as pool:
            pending = pool.map_async(_device_proc, [(server.port, g, info, layers, seconds, start_at, keepalive) for g in groups])
            time.sleep(max(0.0, start_at - time.time()))
            if os.environ.get("BENCH_PYSPY"):
                workers_pids = [c.pid for c in __import__("psutil").Process(server.proc.pid).children()]
                subprocess.Popen(["py-spy", "record", "-p", str(workers_pids[0]), "-d", str(int(seconds) - 2), "-r", "250",
                                  "-f", "raw", "-o", os.environ["BENCH_PYSPY"]],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cpu0 = _tree_cpu(server.proc.pid)
            parts = pending.get()
            cpu1 = _tree_cpu(server.proc.pid)
        stored = json.loads(cli("status", "--data-dir", str(data), "--db-url", url, "--mlflow-uri", "off").stdout)["updates"].get("buffered", 0)
    ok = sum(r[0] for p in parts for r in p)
    bad = sum(r[1] for p in parts for r in p)
    lat = sorted(x for p in parts for r in p for x in r[2])
    return {
        "store": label, "connections": "keep-alive" if keepalive else "one per update", "devices": devices, "gunicorn_workers": workers, "threads_per_worker": threads, "client_processes": procs,
        "seconds": seconds, "accepted": ok, "errors": bad, "stored": stored, "updates_per_s": ok / seconds,
        "latency_ms_p50": 1000 * lat[len(lat) // 2] if lat else None,
        "latency_ms_p95": 1000 * lat[int(len(lat) * 0.95)] if lat else None,
        "latency_ms_p99": 1000 * lat[int(len(lat) * 0.99)] if lat else None,
        "server_cpu_ms_per_update": 1000 * float((cpu1 - cpu0).sum()) / max(ok, 1),
        "server_user_sys_ms_per_update": [round(1000 * float(x) / max(ok, 1), 3) for x in (cpu1 - cpu0)], "load_avg_after": os.getloadavg(),
        "body_bytes": body_bytes, "n_params": int(sum(a.size for a in layers)),
    }


# --------------------------------------------------------------------------- aggregation


def bench_aggregation(package: Path, sizes: list[int], url: str | None, work: Path, label: str) -> list[dict]:
    from infantino.sync_server import store as st
    from infantino.sync_server.aggregate import Strategy
    from infantino.sync_server.process import served_store
    from infantino.sync_server.rounds import aggregate_once

    out = []
    for n in sizes:
        for rule in ("fedavg", "trimmed_mean", "median"):
            folder = work / f"agg-{label}-{n}-{rule}"
            folder.mkdir(parents=True)
            if url:
                from infantino.sync_server.process import scratch_schema_url

                ctx = scratch_schema_url(url)
            else:
                import contextlib

                ctx = contextlib.nullcontext(st.sqlite_url(folder / "server.db"))
            with ctx as store_url:
                store = served_store(store_url, folder, package)
                serving = store.serving()
                size = store.head(serving.head_version).flat.size
                for i in range(16):
                    store.add_client(f"d{i}")
                rng = np.random.default_rng(0)
                t = time.perf_counter()
                for start in range(0, n, 500):
                    recs = [st.UpdateRecord(client_id=1 + (j % 16), idempotency_key=uuid.uuid4().hex, body_sha256="0" * 64,
                                            package_version=serving.package_version, base_head_version=serving.head_version,
                                            n_samples=int(rng.integers(1, 50)), metrics={"accuracy": 0.5},
                                            delta=rng.normal(0, 0.01, size).astype("<f4").tobytes(), delta_norm=1.0)
                            for j in range(start, min(n, start + 500))]
                    store.insert_updates(recs)
                fill = time.perf_counter() - t
                strategy = Strategy(rule=rule, clip_norm="median" if rule != "fedavg" else None)
                result = aggregate_once(store, strategy, min_updates=min(16, n), max_updates=n)  # min_updates counts devices
                store.dispose()
            assert result is not None and result.n_updates == n, (n, result)
            out.append({"store": label, "updates": n, "rule": rule, "seconds": result.seconds, "fill_seconds": fill})
            shutil.rmtree(folder, ignore_errors=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package")
    p.add_argument("--devices", type=int, nargs="+", default=[8, 32, 128], help="concurrent simulated devices, one run each")
    p.add_argument("--agg-sizes", type=int, nargs="+", default=[10, 100, 1000, 10000], help="buffered updates per aggregation step")
    p.add_argument("--quick", action="store_true", help="CI size: 4 devices for 2 s, aggregation of 10 and 100")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--client-procs", type=int, default=2)
    p.add_argument("--pg-url", default=os.environ.get("INFANTINO_TEST_PG_URL"))
    p.add_argument("--keepalive", action="store_true", help="devices keep one HTTP/1.1 connection (default: one per update, as urllib does)")
    p.add_argument("--both-connection-modes", action="store_true")
    p.add_argument("--skip-ingest", action="store_true")
    p.add_argument("--skip-aggregation", action="store_true")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "server.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.devices, args.seconds, args.agg_sizes, args.pg_url = [4], 2.0, [10, 100], None

    work = Path(tempfile.mkdtemp(prefix="infantino-bench-"))
    try:
        package = find_package(args.package) or synthetic_package(work / "package")
        from infantino.edge_runtime.core.package import open_package

        shown = package.resolve().relative_to(REPO) if package.resolve().is_relative_to(REPO) else package
        result = {"package": str(shown), "package_version": open_package(package).version, "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                                       "load_avg_at_start": os.getloadavg()}}
        if not args.skip_ingest:
            runs = []
            for n in args.devices:
                for keepalive in (False, True) if args.both_connection_modes else (args.keepalive,):
                    runs.append(bench_ingest(package, n, args.seconds, args.workers, args.threads, args.client_procs,
                                             work / f"sqlite-{n}-{keepalive}", keepalive=keepalive))
                if args.pg_url:
                    runs.append(bench_ingest(package, n, args.seconds, args.workers, args.threads, args.client_procs,
                                             work / f"pg-{n}", pg_url=args.pg_url, keepalive=args.keepalive))
            result["ingest"] = runs
            i = runs[0]
            print(f"\ningest: {i['gunicorn_workers']} gunicorn workers x {i['threads_per_worker']} threads, "
                  f"{i['seconds']:.0f} s per run, {i['body_bytes']} B/update")
            print(f"  {'devices':>7} {'store':>10} {'connections':>14} {'updates/s':>10} {'accepted':>9} {'stored':>7} {'errors':>7} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'cpu ms/upd':>10}")
            for i in runs:
                print(f"  {i['devices']:7d} {i['store']:>10} {i['connections']:>14} {i['updates_per_s']:10.0f} {i['accepted']:9d} {i['stored']:7d} {i['errors']:7d} "
                      f"{i['latency_ms_p50']:7.1f} {i['latency_ms_p95']:7.1f} {i['latency_ms_p99']:7.1f} {i['server_cpu_ms_per_update']:10.2f}")
            print(f"  load average at start {result['machine']['load_avg_at_start'][0]:.1f} (other jobs share these CPUs)")
        if not args.skip_aggregation:
            rows = bench_aggregation(package, args.agg_sizes, None, work, "sqlite")
            if args.pg_url:
                rows += bench_aggregation(package, args.agg_sizes, args.pg_url, work, "postgresql")
            result["aggregation"] = rows
            print("\naggregation (one step: read deltas, combine, write head, mark updates)")
            print(f"  {'store':>10} {'updates':>8} {'rule':>13} {'seconds':>8}")
            for r in rows:
                print(f"  {r['store']:>10} {r['updates']:8d} {r['rule']:>13} {r['seconds']:8.3f}")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        previous = json.loads(out.read_text()) if out.exists() else {}
        previous.update(result)
        out.write_text(json.dumps(previous, indent=1) + "\n")
        print(f"\nwrote {out}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
