"""Every benchmark runs at CI size (``--quick``) and writes the numbers it promises.

Behaviour only, not speed: a loaded CI machine may be slow, but a percentile must be
positive and ordered, a matrix must have its shape, a footprint must add up."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO, require_data


def run_bench(script: str, *args: str, timeout: int = 300) -> None:
    res = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                         cwd=REPO, timeout=timeout)
    assert res.returncode == 0, f"{script} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


def assert_timing(t: dict) -> None:
    assert 0 < t["p50"] <= t["p95"] and t["n"] > 0


def test_footprint_device_install_is_a_fraction_of_the_workstation_one(tmp_path):
    out = tmp_path / "footprint.json"
    run_bench("bench_footprint.py", "--quick", "--out", str(out))
    rows = {r["extra"]: r for r in json.loads(out.read_text())["extras"]}
    edge, export = rows["edge"], rows["export"]
    assert {"onnxruntime", "numpy", "pillow"} <= set(edge["all"]) and "torch" not in edge["all"]
    assert "torch" in export["all"] and set(edge["all"]) <= set(export["all"])  # export includes the edge extra
    assert 0 < edge["megabytes"] < export["megabytes"]
    assert abs(sum(edge["all"].values()) / 1e6 - edge["megabytes"]) < 0.1 and edge["top"][0]["megabytes"] > 0


def test_edge_latency_bench_quick(tmp_path, tiny_package_dir):
    out = tmp_path / "edge.json"
    run_bench("bench_edge.py", "--quick", "--threads", "1", "2", "--model-dir", str(tiny_package_dir), "--out", str(out))
    res = json.loads(out.read_text())
    assert set(res["threads"]) == {"1", "2"} and res["n"] == 10
    for run in res["threads"].values():
        for key in ("decode_jpeg_ms", "face_crop_ms", "preprocess_ms", "extractor_ms_per_face", "head_predict_ms",
                    "learn_cached_ms", "predict_jpeg_ms"):
            assert_timing(run[key])
        assert run["rss_mb"]["peak_device"] >= run["rss_mb"]["after_open"] > run["rss_mb"]["after_imports"] > 0
    assert_timing(res["sklearn"]["partial_fit_ms"])
    assert "tiny-linear" in res["extractor_runtimes"]["skipped"]  # no torch network to compare for a test package


def test_extractor_bench_quick(tmp_path):
    out = tmp_path / "extractors.json"
    run_bench("bench_extractors.py", "--quick", "--out", str(out))
    res = json.loads(out.read_text())
    lite0 = res["results"][0]
    assert 3e7 < lite0["flops_per_face"] < 1.5e8  # Lite0 at 64x64: ~62 MFLOP
    assert res["machine"]["matmul_peak_gflops"]["t1"] > 0 and lite0["parity_fp32_max_abs"] < 1e-3
    for runtime in ("torch_eager", "ort_fp32", "ort_int8"):  # --quick: one thread
        assert_timing(lite0[f"{runtime}_t1"])
        assert lite0["gflops_per_s"][f"{runtime}_t1"] > 0 and lite0["fraction_of_matmul_peak"][f"{runtime}_t1"] > 0
    assert lite0["ort_fp32_over_torch_t1"] == round(lite0["ort_fp32_t1"]["p50"] / lite0["torch_eager_t1"]["p50"], 4)
    assert "torch_eager_t2" not in lite0


def test_server_bench_quick(tmp_path):
    out = tmp_path / "server.json"
    run_bench("bench_server.py", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    ingest = result["ingest"][0]
    assert ingest["devices"] == 4 and ingest["accepted"] > 0 and ingest["stored"] == ingest["accepted"] and ingest["errors"] == 0
    assert ingest["latency_ms_p50"] <= ingest["latency_ms_p95"] <= ingest["latency_ms_p99"]
    assert {(r["updates"], r["rule"]) for r in result["aggregation"]} >= {(10, "fedavg"), (100, "median")}
    assert all(r["seconds"] > 0 for r in result["aggregation"])


def test_continual_bench_quick(tmp_path):
    images, fer = require_data("infant"), require_data("fer2013", "fer2013_train.npz")
    out = tmp_path / "continual.json"
    run_bench("bench_continual.py", "--quick", "--images", str(images), "--fer", str(fer), "--out", str(out))
    res = json.loads(out.read_text())
    for method in ("frozen", "plain", "ours", "refit"):
        R = res["matrices"][method][0]
        assert len(R) == len(R[0]) == 4 and all(0 <= v <= 1 for row in R for v in row)
        assert abs(res["summary"][method]["average_accuracy"] - sum(R[-1]) / 4) < 1e-9
    frozen = res["matrices"]["frozen"][0]
    assert all(row == frozen[0] for row in frozen) and res["summary"]["frozen"]["bwt"] == 0  # a frozen head never changes
    assert res["matrices"]["plain"][0] != frozen  # learning moved the head
    assert out.with_suffix(".png").stat().st_size > 0


def test_infant_cv_quick_scores_every_pipeline_and_the_peer_on_the_same_folds(tmp_path):
    require_data("infant")
    out = tmp_path / "cv"
    run_bench("infant_cv.py", "--quick", "--out", str(out), "--work", str(tmp_path / "work"), timeout=900)
    res = json.loads((out / "summary.json").read_text())
    rows = res["pipelines"]
    assert res["protocol"]["folds"] == 3 and res["protocol"]["n_photos"] == 28
    assert any(n.startswith("peer: fer") for n in rows) and any("fine-tuned extractor" in n for n in rows)
    assert any(n.startswith("haar |") for n in rows)
    for r in rows.values():
        assert len(r["folds"]) == 3 and {f["fold"] for f in r["folds"]} == {0, 1, 2}
        assert 0 <= r["accuracy"]["mean"] <= 1 and 0 <= r["valence"]["mean"] <= 1
    assert res["face_found"]["haar"] < res["face_found"]["bf_short_m25"]
    assert (out / "infant_cv.png").stat().st_size > 0


def test_personalization_quick_scores_every_method_on_the_same_cameras(tmp_path):
    require_data("infant")
    out = tmp_path / "pers"
    run_bench("personalization.py", "--quick", "--out", str(out), "--work", str(tmp_path / "work"), timeout=900)
    res = json.loads((out / "summary.json").read_text())
    table, proto = res["table"], res["protocol"]
    assert proto["folds"] == 3 and proto["profiles"] == ["day", "night_ir"]
    cells = {f"{a}|{b}|{s}" for a in proto["alphas"] for b in proto["budgets"] for s in ("queue", "random")}
    for method in ("frozen", "today's learner", "prior from label counts", "EM prior, unlabelled frames (Saerens)"):
        assert set(table[method]) == cells
    new = next(m for m in table if m.startswith("new: the device's learner"))
    assert all(c["n"] == table["frozen"][k]["n"] > 0 for k, c in table[new].items())  # the same cameras for every row
    assert all(v["gain"] == 0 for v in table["frozen"].values())
    assert set(res["learn_whole_fold"]["mean"]) >= {"frozen", "today's learner", "new learner"}
    assert (out / "personalization_labels.png").stat().st_size > 0 and (out / "personalization_profiles.png").stat().st_size > 0


def test_frame_cost_quick_times_the_bare_models_and_predict_in_one_run(tmp_path):
    require_data("infant")
    out = tmp_path / "frame_cost.json"
    run_bench("bench_frame_cost.py", "--quick", "--out", str(out))
    res = json.loads(out.read_text())
    assert_timing(res["bare_ms"]) and assert_timing(res["predict_ms"])
    assert res["bare_ms"]["n"] == res["predict_ms"]["n"] == 30 and res["frames_with_face"] > 0
    assert res["ratio_p50"] == round(res["predict_ms"]["p50"] / res["bare_ms"]["p50"], 3) > 0
