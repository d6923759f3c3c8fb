"""``infantino-demo``: run a small fleet end to end and measure what its labels do to the global head.

    infantino-demo [--images DIR] [--model-dir DIR] [--devices 4] [--rounds 5] [--budget 8]
                   [--out runs/demo] [--refresh-package DIR --refresh-after R] [--share-crops] [--quick]
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from infantino.edge_runtime.core.clitools import OneLineParser, add_verbose, run_command
from infantino.edge_runtime.core.package import open_package
from infantino.edge_runtime.core.preprocess import CLASSES

from .cameras import plan_cameras
from .data import demo_model_dir, find_images, fresh_out, plan_split, trained_on_held_out
from .fleet import STRATEGIES, FleetPlan, run_fleet
from .report import header, plot, row, write_summary

PROG = "infantino-demo"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    add_verbose(p)
    p.add_argument("--images", help="ImageFolder of photos (default: $INFANTINO_DATA/infant, else ../shared/data/infant)")
    p.add_argument("--model-dir", help="model package to start from (default: $INFANTINO_MODEL_DIR, else the "
                                        "demo's package data/models-demo, else the release)")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--budget", type=int, default=8, help="labels a caregiver gives per device per round")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="output folder, recreated on each run (default: %(default)s)")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help="labelling arms to run (default: %(default)s)")
    p.add_argument("--refresh-package", help="publish this package (through the gate) after --refresh-after rounds")
    p.add_argument("--refresh-after", type=int, help="round after which --refresh-package is published")
    p.add_argument("--share-crops", action="store_true", help="devices opt in to uploading their labelled crops")
    p.add_argument("--mix-alpha", type=float, default=0.3, help="each camera's class mix ~ Dirichlet(alpha), as one baby's "
                                                                 "days are skewed; 0: every camera the uniform mix (default: %(default)s)")
    p.add_argument("--limit", type=int, help="use only this many photos (seeded)")
    p.add_argument("--no-mlflow", action="store_true", help="run the server without MLflow")
    p.add_argument("--quick", action="store_true", help="CI size: 2 devices, 2 rounds, budget 3, 40 photos, one arm")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.devices, args.rounds, args.budget, args.limit = 2, 2, 3, args.limit or 40
        args.strategies = args.strategies if "," not in args.strategies else "uncertainty"
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None  # a kill cleans up as Ctrl-C does
    try:
        return run_command(PROG, lambda: _run_or_stop(args), verbose=args.verbose)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _run_or_stop(args: argparse.Namespace) -> int:
    """``_run``; Ctrl-C or SIGTERM ends it with 130 once the server it started is stopped."""
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the server was stopped", file=sys.stderr)
        return 130


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _run(args: argparse.Namespace) -> int:
    t0 = time.time()
    images = find_images(args.images)
    args.model_dir = args.model_dir or str(demo_model_dir())
    strategies = _checked_strategies(args)
    shards, test = plan_split(images, args.devices, args.seed, limit=args.limit)
    _check_packages(args, test)
    out = fresh_out(Path(args.out).resolve())  # absolute: the server process runs from the repository and
    # Flask resolves a relative file path against its package folder
    gate_dir = _write_test_folder(out / "held-out", test) if args.refresh_package else None
    cameras = plan_cameras(shards, test, len(open_package(Path(args.model_dir), verify=False).manifest.classes),
                           args.mix_alpha, args.seed)
    print(f"{sum(map(len, shards))} photos in {args.devices} camera streams, {len(test)} held out; "
          f"{args.rounds} rounds, {args.budget} labels per camera per round; package {args.model_dir}")
    for cam in cameras:
        print(f"  {cam.name}: {cam.profile:11s} mix " + " ".join(f"{c[:3]} {m:.2f}" for c, m in zip(CLASSES, cam.mix) if m >= 0.05)
              + f"  ({len(cam.stream)} frames, {len(cam.test)} own held-out)")
    print("cam columns: each camera on its own held-out frames; global: the fleet's head on the balanced held-out photos")
    arms = {}
    for strategy in strategies:
        plan = FleetPlan(Path(args.model_dir), cameras, test, args.rounds, args.budget, strategy, args.seed,
                         share_crops=args.share_crops,
                         refresh_package=Path(args.refresh_package) if args.refresh_package else None,
                         refresh_after=args.refresh_after, gate_dirs=[str(gate_dir)] if gate_dir else [])
        arms[strategy] = _run_arm(plan, out / strategy, args)
    settings = {k: v for k, v in vars(args).items()}
    settings.update(images=str(images), n_test=len(test), shard_sizes=[len(s) for s in shards], seconds=round(time.time() - t0, 1),
                    cameras=[{"name": c.name, "profile": c.profile, "mix": dict(zip(CLASSES, c.mix)), "frames": len(c.stream),
                              "own_test": len(c.test)} for c in cameras])
    _print_results(arms, write_summary(out, arms, settings), plot(out, arms))
    if not args.no_mlflow:
        first = out.resolve() / strategies[0] / "server"
        print(f"MLflow: mlflow ui --backend-store-uri sqlite:///{first / 'mlflow.db'} "
              f"--default-artifact-root {first / 'mlartifacts'}   (then open http://127.0.0.1:5000)")
    print(f"done in {time.time() - t0:.0f} s")
    return 0


def _checked_strategies(args: argparse.Namespace) -> list[str]:
    """The labelling arms asked for, once the options that go together are checked."""
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if unknown := set(strategies) - set(STRATEGIES):
        raise ValueError(f"unknown strategy {sorted(unknown)}; choose from {', '.join(STRATEGIES)}")
    if (args.refresh_package is None) != (args.refresh_after is None):
        raise ValueError("--refresh-package and --refresh-after go together")
    if args.refresh_after is not None and not 1 <= args.refresh_after <= args.rounds:
        raise ValueError(f"--refresh-after must be a round from 1 to {args.rounds}")
    return strategies


def _check_packages(args: argparse.Namespace, test: list) -> None:
    """A missing or malformed package, or one trained on held-out photos: one line, before anything is wiped."""
    open_package(Path(args.model_dir), verify=False)
    for package in filter(None, [args.model_dir, args.refresh_package]):
        if leaked := trained_on_held_out(Path(package), test):
            raise ValueError(f"{package} was trained on {leaked} of the {len(test)} held-out photos "
                             f"(seed {args.seed}); use the seed of the split it was trained on")


def _progress_bar(total: int, strategy: str):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is a nicety (tqdm ships with the export extra)
        return None
    # disable=None: no bar when stderr is not a terminal (logs, CI)
    return tqdm(total=total, desc=f"{strategy} labelling", unit="round", leave=False, disable=None)


def _run_arm(plan: FleetPlan, out: Path, args: argparse.Namespace) -> list:
    """One labelling arm's fleet, its table printed a row per round as the rounds end."""
    bar = _progress_bar(args.rounds + 1, plan.strategy)
    lines = [header(args.devices)]

    def on_round(record):
        lines.append(row(plan.strategy, record))
        text = lines[-1] if len(lines) > 2 else "\n".join(lines)
        if bar is not None:
            bar.update(1)
            bar.write(text)
        else:
            print(text, flush=True)

    records = run_fleet(plan, out, on_round, mlflow=not args.no_mlflow)
    if bar is not None:
        bar.close()
    return records


def _print_results(arms: dict, summary: Path, plots: list) -> None:
    print()
    for strategy, recs in arms.items():
        print(f"{strategy:11s} global head on held-out photos: {recs[0].global_accuracy:.3f} -> {recs[-1].global_accuracy:.3f} "
              f"after {recs[-1].labels_spent} labels")
        before, after = np.mean(recs[0].device_accuracy), np.mean(recs[-1].device_accuracy)
        print(f"{'':11s} cameras on their own held-out frames: {before:.3f} -> {after:.3f} (mean; "
              + ", ".join(f"{a:+.3f}" for a in np.subtract(recs[-1].device_accuracy, recs[0].device_accuracy)) + ")")
        for r in recs:
            if r.gate is not None:
                decision = "promoted" if r.refreshed else "refused by the gate"
                print(f"{'':11s} refreshed package after round {r.round} ({decision}): global head "
                      f"{r.gate['held_out_before']:.3f} before -> {r.global_accuracy:.3f} after")
    print(f"summary: {summary}" + (f"; plots: {', '.join(str(p) for p in plots)}" if plots else " (no matplotlib: no plots)"))


def _write_test_folder(root: Path, items: list[tuple[Path, int]]) -> Path:
    """The held-out photos as an ImageFolder of links, for the server's publish gate."""
    from infantino.edge_runtime.core.imagefolder import write_split

    return write_split({"test": items}, root)["test"]


if __name__ == "__main__":
    sys.exit(main())
