"""Extractor latency: EfficientNet-Lite0 vs B0, ONNX Runtime fp32 / int8 vs PyTorch eager.

For each architecture (weights from a checkpoint when given, else fresh: latency does not
depend on the weights) it exports fp32 ONNX, quantises it statically on FER faces, and
times one face (batch 1) at 1 and 2 threads, p50/p95. Also counts FLOPs at our input size.

    python bench/bench_extractors.py [--lite0-ckpt CKPT] [--b0-ckpt CKPT] [--repeats 200]

Prints a table and writes bench/results/extractors.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from edge_runtime.preprocess import DEFAULT_SPEC, normalize
from export.data import load_fer
from export.model import EmbeddingExtractor, ModelConfig, build_model
from export.onnx_export import export_extractor, session
from export.quantize import quantize_extractor
from export.train import load_checkpoint

RESULTS = Path(__file__).parent / "results"


def _percentiles(times: list[float]) -> dict:
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95))}


def time_call(fn, repeats: int, warmup: int = 10) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return _percentiles(times)


def matmul_peak_gflops(threads: int = 1, n: int = 1024, repeats: int = 10) -> float:
    """What this machine's BLAS reaches on a large float32 matmul: a practical ceiling to compare with."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    with threadpool_limits(limits=threads):
        a @ a
        best = min(time_call(lambda: a @ a, 1, warmup=0)["p50_ms"] for _ in range(repeats))
    return 2 * n**3 / (best / 1000) / 1e9


def flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return int(counter.get_total_flops())


def bench_arch(arch: str, ckpt: str | None, calib: np.ndarray, x: np.ndarray, repeats: int) -> dict:
    net = load_checkpoint(ckpt)[0] if ckpt else build_model(ModelConfig(arch=arch), imagenet_init=False).eval()
    extractor = EmbeddingExtractor(net).eval()
    out: dict = {"arch": arch, "weights": ckpt or "untrained", "params": sum(p.numel() for p in net.parameters())}
    out["flops_per_face"] = flops(extractor, torch.from_numpy(x))
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_extractor(net, fp32, (1, *DEFAULT_SPEC.size))
        quantize_extractor(fp32, int8, calib)
        out["fp32_mb"], out["int8_mb"] = fp32.stat().st_size / 1e6, int8.stat().st_size / 1e6
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                out[f"torch_eager_t{threads}"] = time_call(lambda: extractor(torch.from_numpy(x)), repeats // 2)
            for name, path in (("ort_fp32", fp32), ("ort_int8", int8)):
                sess = session(path, threads)
                out[f"{name}_t{threads}"] = time_call(lambda: sess.run(None, {"input": x}), repeats)
    t1 = out["ort_fp32_t1"]["p50_ms"] / 1000
    out["ort_fp32_t1_gflops_per_s"] = out["flops_per_face"] / t1 / 1e9
    for t in (1, 2):
        for prec in ("fp32", "int8"):
            out[f"torch_over_ort_{prec}_t{t}"] = out[f"torch_eager_t{t}"]["p50_ms"] / out[f"ort_{prec}_t{t}"]["p50_ms"]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fer", default=str(Path(__file__).resolve().parents[2] / "shared/data/fer2013/fer2013_train.npz"))
    parser.add_argument("--lite0-ckpt")
    parser.add_argument("--b0-ckpt")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=str(RESULTS / "extractors.json"))
    parser.add_argument("--quick", action="store_true", help="CI size: Lite0 only, 20 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 20

    faces = load_fer(args.fer, limit=256).pixels
    calib, x = normalize(faces[:128]), normalize(faces[128:129])
    rows = [bench_arch("efficientnet_lite0", args.lite0_ckpt, calib, x, args.repeats)]
    if not args.quick:
        rows.append(bench_arch("efficientnet_b0", args.b0_ckpt, calib, x, args.repeats))
    peak = matmul_peak_gflops(1)
    for r in rows:
        r["fraction_of_matmul_peak_fp32_t1"] = r["ort_fp32_t1_gflops_per_s"] / peak
    print(f"{'arch':20s} {'MFLOPs':>7s} {'thr':>3s} {'torch p50':>10s} {'ort fp32 p50':>13s} {'ort int8 p50':>13s} {'int8 p95':>9s}")
    for r in rows:
        for t in (1, 2):
            print(f"{r['arch']:20s} {r['flops_per_face'] / 1e6:7.0f} {t:3d} {r[f'torch_eager_t{t}']['p50_ms']:10.2f} "
                  f"{r[f'ort_fp32_t{t}']['p50_ms']:13.2f} {r[f'ort_int8_t{t}']['p50_ms']:13.2f} {r[f'ort_int8_t{t}']['p95_ms']:9.2f}")
    for r in rows:
        print(f"{r['arch']}: ORT fp32 reaches {r['ort_fp32_t1_gflops_per_s']:.1f} GFLOP/s at 1 thread, "
              f"{100 * r['fraction_of_matmul_peak_fp32_t1']:.0f} % of a 1024x1024 float32 matmul ({peak:.1f} GFLOP/s); "
              f"torch eager / ORT: {r['torch_over_ort_fp32_t1']:.1f}x (fp32), {r['torch_over_ort_int8_t1']:.1f}x (int8)")
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": __import__("os").cpu_count(),
                          "matmul_peak_gflops_t1": peak},
              "input": [1, 1, *DEFAULT_SPEC.size], "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
