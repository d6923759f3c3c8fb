"""Hostile bodies against a real sync server, at a size beyond the default test suite's.

    python bench/bench_hostile.py [--repeat 10] [--clients 8] [--out bench/results/hostile.json]

The corpus of ``tests/hostile_bodies.py`` (zip bombs with true and false sizes, every .npy
header field bent, huge and negative numbers, unicode, broken zips; ``--repeat`` rounds of
its random part) is POSTed to ``/v1/updates`` and ``/v1/crops`` of an ``infantino-server
run`` (gunicorn, 2 workers x 8 threads, SQLite) on 127.0.0.1 by ``--clients`` threads.
Reports the statuses seen (none may be 5xx), the server's RSS (all its processes) before and
after, and the time. ``tests/test_server_hostile.py`` runs the small corpus in CI.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the corpus generator the tests use

import hostile_bodies  # noqa: E402
from test_server_hostile import group_rss_mb, post  # noqa: E402

from infantino.export.tiny_package import build_tiny_package  # noqa: E402
from infantino.sync_server.process import LocalServer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=10, help="rounds of the corpus's random part")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hostile.json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        package = build_tiny_package(Path(tmp) / "model")
        corpus = hostile_bodies.corpus(seed=1, repeat=args.repeat)
        with LocalServer(Path(tmp), package) as server:
            token = server.token("cam1")
            port, pgid = server.process.port, server.process.proc.pid
            for _ in range(4):
                post(port, "/v1/updates", hostile_bodies.zip_of({}), token)
            base = group_rss_mb(pgid)
            jobs = [(path, body) for _, body in corpus for path in ("/v1/updates", "/v1/crops")]
            t0 = time.monotonic()
            with ThreadPoolExecutor(args.clients) as pool:
                statuses = list(pool.map(lambda job: post(port, job[0], job[1], token), jobs))
            seconds = time.monotonic() - t0
            after = group_rss_mb(pgid)
    result = {"bodies": len(corpus), "requests": len(jobs), "clients": args.clients, "seconds": round(seconds, 2),
              "statuses": dict(sorted(collections.Counter(statuses).items())), "max_status": max(statuses),
              "rss_mb_before": round(base, 1), "rss_mb_after": round(after, 1), "rss_growth_mb": round(after - base, 1)}
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["max_status"] < 500 and result["rss_growth_mb"] < 64 else 1


if __name__ == "__main__":
    sys.exit(main())
