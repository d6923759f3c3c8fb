"""Extractor latency: EfficientNet-Lite0 vs B0, ONNX Runtime fp32 / int8 vs PyTorch eager.

For each architecture (weights from a checkpoint when given, else fresh: latency does not
depend on the weights) it exports fp32 ONNX, quantises it statically on FER faces (noise
when the data is absent), and times one face (batch 1) at 1 and 2 threads, p50/p95, in
the same process and run. Also counts the FLOPs at our input size and sets the achieved
GFLOP/s against the machine's practical peak (a 1024x1024 float32 numpy matmul).

    python bench/bench_extractors.py [--lite0-ckpt CKPT] [--b0-ckpt CKPT] [--repeats 200] [--quick]

Prints a table and writes bench/results/extractors.json. ``compare_runtimes`` also serves
bench_edge.py, which times the release package's own ONNX files against the same weights
in torch.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import numpy as np

from _timing import matmul_peak_gflops, timeit

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]
THREADS = (1, 2)


def flops(module, x) -> int:
    """FLOPs of one forward pass (torch's counter: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return int(counter.get_total_flops())


def peaks(threads: tuple[int, ...] = THREADS) -> dict[str, float]:
    return {f"t{t}": round(matmul_peak_gflops(t), 2) for t in threads}


def compare_runtimes(extractor, onnx: dict[str, Path], x: np.ndarray, repeats: int, peak: dict[str, float],
                     threads: tuple[int, ...] = THREADS) -> dict:
    """Torch eager ``extractor`` vs ONNX Runtime on each of ``onnx`` ({"fp32": path, "int8": path}),
    batch ``x``, at each thread count: p50/p95, ORT/torch time ratios, achieved GFLOP/s and
    its fraction of ``peak`` (matmul GFLOP/s per thread count). Also the torch-vs-fp32 parity."""
    import torch

    from infantino.edge_runtime.core.onnx_session import cpu_session

    xt = torch.from_numpy(x)
    out: dict = {"flops_per_face": flops(extractor, xt) // len(x)}
    with torch.no_grad():
        ref = extractor(xt).numpy()
    for t in threads:
        torch.set_num_threads(t)
        with torch.no_grad():
            out[f"torch_eager_t{t}"] = timeit(lambda: extractor(xt), max(10, repeats // 2))
        for prec, path in onnx.items():
            sess = cpu_session(path, t, spin=True)  # spinning threads: the runtime at its fastest, as torch runs
            out[f"ort_{prec}_t{t}"] = timeit(lambda: sess.run(None, {"input": x}), repeats)
            out[f"ort_{prec}_over_torch_t{t}"] = round(out[f"ort_{prec}_t{t}"]["p50"] / out[f"torch_eager_t{t}"]["p50"], 4)
            if prec == "fp32":
                out["parity_fp32_max_abs"] = float(np.abs(sess.run(None, {"input": x})[0] - ref).max())
    out["gflops_per_s"] = {k: round(out["flops_per_face"] * len(x) / (out[k]["p50"] / 1e3) / 1e9, 2)
                           for k in list(out) if k.startswith(("torch_eager_t", "ort_")) and isinstance(out[k], dict)}
    out["fraction_of_matmul_peak"] = {k: round(v / peak[k.rsplit("_", 1)[1]], 3) for k, v in out["gflops_per_s"].items()}
    return out


def bench_arch(arch: str, ckpt: str | None, calib: np.ndarray, x: np.ndarray, repeats: int, peak: dict[str, float],
               threads: tuple[int, ...] = THREADS) -> dict:
    from infantino.export.model import EmbeddingExtractor, ModelConfig, build_model
    from infantino.export.onnx_export import export_extractor
    from infantino.export.quantize import quantize_extractor
    from infantino.export.train import load_checkpoint

    from infantino.edge_runtime.core.preprocess import DEFAULT_SPEC

    net = load_checkpoint(ckpt)[0] if ckpt else build_model(ModelConfig(arch=arch), imagenet_init=False).eval()
    out: dict = {"arch": arch, "weights": ckpt or "untrained", "params": sum(p.numel() for p in net.parameters())}
    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_extractor(net, fp32, (1, *DEFAULT_SPEC.size))
        quantize_extractor(fp32, int8, calib)
        out["fp32_mb"], out["int8_mb"] = fp32.stat().st_size / 1e6, int8.stat().st_size / 1e6
        out.update(compare_runtimes(EmbeddingExtractor(net).eval(), {"fp32": fp32, "int8": int8}, x, repeats, peak, threads))
    return out


def print_rows(rows: list[dict], peak: dict[str, float], threads: tuple[int, ...] = THREADS) -> None:
    """One line per (extractor, threads): p50 (p95) of torch and ORT, ORT/torch, GFLOP/s and % of peak."""
    print(f"{'extractor':20s} {'MFLOP':>6s} {'thr':>3s} {'torch p50 (p95)':>16s} {'ORT fp32 p50 (p95)':>19s} "
          f"{'ORT int8 p50 (p95)':>19s} {'fp32/torch':>10s} {'int8/torch':>10s} {'GFLOP/s torch|fp32|int8':>24s}")
    for r in rows:
        for t in threads:
            cell = lambda k: f"{r[k]['p50']:.2f} ({r[k]['p95']:.2f})"  # noqa: E731
            g = r["gflops_per_s"]
            print(f"{r['arch']:20s} {r['flops_per_face'] / 1e6:6.0f} {t:3d} {cell(f'torch_eager_t{t}'):>16s} {cell(f'ort_fp32_t{t}'):>19s} "
                  f"{cell(f'ort_int8_t{t}'):>19s} {r[f'ort_fp32_over_torch_t{t}']:10.3f} {r[f'ort_int8_over_torch_t{t}']:10.3f} "
                  f"{g[f'torch_eager_t{t}']:7.1f}|{g[f'ort_fp32_t{t}']:6.1f}|{g[f'ort_int8_t{t}']:6.1f}")
    print("peak (float32 numpy matmul 1024^3, best of 10): " + ", ".join(f"{v:.1f} GFLOP/s at {k[1:]} thread(s)" for k, v in peak.items()))
    for r in rows:
        f, t = r["fraction_of_matmul_peak"], threads[0]
        print(f"{r['arch']}, {t} thread(s): torch {100 * f[f'torch_eager_t{t}']:.0f} %, ORT fp32 {100 * f.get(f'ort_fp32_t{t}', float('nan')):.0f} % "
              f"of that peak (int8 multiply-adds counted as FLOPs: {100 * f.get(f'ort_int8_t{t}', float('nan')):.0f} %)")


def calibration_faces(fer: Path, n: int = 129) -> tuple[np.ndarray, str]:
    """Normalised FER faces for int8 calibration and timing, or noise when the data is absent."""
    from infantino.edge_runtime.core.preprocess import DEFAULT_SPEC, normalize

    if fer.exists():
        from infantino.export.data import load_fer

        return normalize(load_fer(fer, limit=n).pixels), "fer2013"
    rng = np.random.default_rng(0)
    return normalize(rng.integers(0, 256, (n, *DEFAULT_SPEC.size), dtype=np.uint8)), "noise (FER not found)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fer", type=Path, default=REPO.parent / "shared/data/fer2013/fer2013_train.npz")
    parser.add_argument("--lite0-ckpt")
    parser.add_argument("--b0-ckpt")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "extractors.json")
    parser.add_argument("--threads", type=int, nargs="+", default=list(THREADS))
    parser.add_argument("--quick", action="store_true", help="CI size: Lite0 only, 1 thread, 10 repeats, 16 calibration faces")
    args = parser.parse_args(argv)
    n_calib = 128
    if args.quick:
        args.repeats, args.threads, n_calib = 10, [1], 16

    faces, source = calibration_faces(args.fer, n_calib + 1)
    calib, x = faces[:n_calib], faces[n_calib:]
    threads = tuple(args.threads)
    peak = peaks(threads)
    rows = [bench_arch("efficientnet_lite0", args.lite0_ckpt, calib, x, args.repeats, peak, threads)]
    if not args.quick:
        rows.append(bench_arch("efficientnet_b0", args.b0_ckpt, calib, x, args.repeats, peak, threads))
    print_rows(rows, peak, threads)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "matmul_peak_gflops": peak, "loadavg_1min": os.getloadavg()[0]},
              "input": [1, 1, *x.shape[2:]], "calibration": source, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
