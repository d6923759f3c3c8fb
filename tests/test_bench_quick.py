"""Every benchmark runs at CI size and writes the numbers it promises (not timed: behaviour only)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, require_data


def run_bench(script: str, *args: str, timeout: int = 300) -> None:
    res = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                         cwd=REPO, timeout=timeout)
    assert res.returncode == 0, f"{script} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


def test_footprint_device_install_is_a_fraction_of_the_workstation_one(tmp_path):
    out = tmp_path / "footprint.json"
    run_bench("bench_footprint.py", "--extras", "edge", "export", "--out", str(out))
    rows = {r["extra"]: r for r in json.loads(out.read_text())["extras"]}
    assert "onnxruntime" in rows["edge"]["all"] and "torch" not in rows["edge"]["all"]
    assert "torch" in rows["export"]["all"] and rows["edge"]["megabytes"] < rows["export"]["megabytes"]


def test_server_bench_quick(tmp_path):
    out = tmp_path / "server.json"
    run_bench("bench_server.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    ingest = result["ingest"][0]
    assert ingest["devices"] == 4 and ingest["accepted"] > 0 and ingest["stored"] == ingest["accepted"] and ingest["errors"] == 0
    assert ingest["latency_ms_p50"] <= ingest["latency_ms_p95"] <= ingest["latency_ms_p99"]
    assert {(r["updates"], r["rule"]) for r in result["aggregation"]} >= {(10, "fedavg"), (100, "median")}


def test_edge_latency_bench_quick(tmp_path):
    out = tmp_path / "edge.json"
    run_bench("bench_edge.py", "--n", "10", "--threads", "2", "--out", str(out))
    res = json.loads(out.read_text())
    assert res["machine"]["threads"] == 2
    for key in ("predict_jpeg_ms", "learn_cached_ms", "decode_jpeg_ms", "head_and_uncertainty_ms"):
        assert 0 < res[key]["p50"] <= res[key]["p95"]
    assert res["rss_mb"]["peak_device"] > res["rss_mb"]["after_imports"] > 0


def test_extractor_bench_quick(tmp_path):
    fer = require_data("fer2013", "fer2013_train.npz")
    out = tmp_path / "extractors.json"
    run_bench("bench_extractors.py", "--quick", "--fer", str(fer), "--out", str(out))
    res = json.loads(out.read_text())
    lite0 = res["results"][0]
    assert lite0["flops_per_face"] > 1e7 and res["machine"]["matmul_peak_gflops_t1"] > 0
    assert lite0["torch_over_ort_fp32_t1"] > 0 and 0 < lite0["fraction_of_matmul_peak_fp32_t1"]


def test_continual_bench_quick(tmp_path):
    images, fer = require_data("infant"), require_data("fer2013", "fer2013_train.npz")
    out = tmp_path / "continual.json"
    run_bench("bench_continual.py", "--quick", "--images", str(images), "--fer", str(fer), "--out", str(out))
    res = json.loads(out.read_text())
    for method in ("frozen", "plain", "ours", "refit"):
        R = res["matrices"][method][0]
        assert len(R) == len(R[0]) == 4 and all(0 <= v <= 1 for row in R for v in row)
    frozen = res["matrices"]["frozen"][0]
    assert all(row == frozen[0] for row in frozen) and res["summary"]["frozen"]["bwt"] == 0  # a frozen head never changes
    assert Path(out.with_suffix(".png")).stat().st_size > 0
