"""bench/bench_watch.py runs at CI size and writes every number it promises (behaviour, not speed)."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, require_data


def test_bench_watch_quick_reports_fps_cpu_latency_rss_and_bytes_per_day(tmp_path, tiny_package_dir):
    require_data("infant")
    out = tmp_path / "watch.json"
    res = subprocess.run([sys.executable, str(REPO / "bench" / "bench_watch.py"), "--quick", "--model-dir", str(tiny_package_dir),
                          "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["sustained"]["frames"] == 60 and r["sustained"]["fps"] > 0 and 0 < r["sustained"]["cpu_share_of_one_core"]
    assert r["at_2fps"]["frames"] == 6 and 0 < r["at_2fps"]["cpu_share_of_one_core"] < 2
    lat = r["at_2fps"]["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] and lat["n"] == 6
    assert r["rss"]["end_mb"] > 0 and r["rss"]["samples"] >= 1
    t = r["timeline"]
    assert t["frame_lines"] == 60 and t["bytes_per_day"] > 2 * 86400 * 20 and t["mb_per_day"] > 0
    assert r["video"]["size"] == [640, 480] and "sustained:" in res.stdout
