"""``infantino-edge``: the device's command line.

Each subcommand is one ``add_<name>(subparsers)`` function that builds its parser and
sets ``func``; ``SUBCOMMANDS`` lists them. A new subcommand (``sync``, ``annotate``) is a
new function plus one entry in that list. Any error ends with a one-line message on
stderr and exit code 1 (2 for a malformed command line); ``-v`` adds the traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable

from .core.clitools import OneLineParser, UsageError, add_verbose, run_command
from .device import Device, DeviceConfig, default_model_dir, default_state_dir
from .camera import describe

PROG = "infantino-edge"


def _device_options(p: argparse.ArgumentParser, state: bool = True) -> None:
    p.add_argument("--model-dir", type=Path, default=None, help=f"model package folder (default: {default_model_dir()})")
    if state:
        p.add_argument("--state-dir", type=Path, default=None, help=f"device state folder (default: {default_state_dir()})")
    p.add_argument("--threads", type=int, default=DeviceConfig.threads, help="ONNX Runtime threads (default: %(default)s)")
    p.add_argument("--precision", choices=["auto", "int8", "fp32"], default="auto", help="extractor precision (default: auto = int8 if packaged)")
    p.add_argument("--no-face-detect", action="store_true", help="images are face crops already: skip the Haar detector")


def _config(args: argparse.Namespace, **extra) -> DeviceConfig:
    return replace(DeviceConfig(), threads=args.threads, precision=args.precision, detect_faces=not args.no_face_detect, **extra)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# --------------------------------------------------------------------------- predict


def add_predict(sub) -> None:
    p = sub.add_parser("predict", help="classify images; uncertain ones go to the annotation queue")
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    _device_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    p.add_argument("--no-queue", action="store_true", help="do not queue uncertain frames")
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    device = Device(args.model_dir, args.state_dir, _config(args))
    preds = [device.predict(path, enqueue=not args.no_queue) for path in args.images]
    if args.json:
        _print_json([{"image": str(path), **p.to_dict()} for path, p in zip(args.images, preds)])
        return 0
    for path, p in zip(args.images, preds):
        queued = f"  queued {p.queued_id}" if p.queued_id else ""
        face = "face" if p.face_found else "no face (centre crop)"
        print(f"{path}\t{p.label}\tp={float(p.probabilities[p.index]):.2f}\tuncertainty={p.uncertainty:.2f}\t{face}{queued}")
    return 0


# --------------------------------------------------------------------------- learn


def add_learn(sub) -> None:
    p = sub.add_parser("learn", help="teach the device the label of one image (saved at once)")
    p.add_argument("image", type=Path, metavar="IMAGE")
    p.add_argument("--label", required=True, metavar="NAME", help="one of the package's classes")
    _device_options(p)
    p.set_defaults(func=run_learn)


def run_learn(args: argparse.Namespace) -> int:
    device = Device(args.model_dir, args.state_dir, _config(args))
    device.label_index(args.label)  # refuse an unknown label before decoding anything
    r = device.learn(args.image, args.label, save=True)
    what = "learned" if r.updated else "rolled back by the guard" if r.rolled_back else "kept back for the guard"
    print(f"{args.image}: {args.label} {what}; head version {r.head_version}, state generation {device.generation}")
    print(describe(device.status()["camera"]))
    return 0


# --------------------------------------------------------------------------- queue


def add_queue(sub) -> None:
    p = sub.add_parser("queue", help="list frames waiting for a caregiver's label")
    p.add_argument("--state-dir", type=Path, default=None, help=f"device state folder (default: {default_state_dir()})")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_queue)


def run_queue(args: argparse.Namespace) -> int:
    from .annotation_queue import AnnotationQueue

    state = args.state_dir if args.state_dir is not None else default_state_dir()
    queue = AnnotationQueue(Path(state) / "queue")
    items = queue.items()
    if args.json:
        _print_json([{**i.to_dict(), "crop": str(queue.crop_path(i.id))} for i in items])
        return 0
    if not items:
        print("no frames waiting for a label")
    for i in items:
        print(f"{i.id}\tpredicted {i.predicted}\tuncertainty={i.uncertainty:.2f}\t{i.source}\t{queue.crop_path(i.id)}")
    return 0


# --------------------------------------------------------------------------- evaluate


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="score test folders, optionally before/after learning a labelled stream")
    p.add_argument("--test", action="append", default=[], type=Path, metavar="DIR", help="ImageFolder test set (repeatable)")
    p.add_argument("--crop-test", action="append", default=[], type=Path, metavar="DIR",
                   help="ImageFolder of ready face crops (e.g. FER), scored without face detection (repeatable)")
    p.add_argument("--stream", type=Path, metavar="DIR", help="ImageFolder fed through predict + learn in a seeded order")
    _device_options(p, state=False)
    p.add_argument("--state-dir", type=Path, default=None, help="start from a copy of this device state (default: fresh from the package)")
    p.add_argument("--replay-seed", type=Path, default=None, help="npz of source-domain embeddings (x, y) to replay instead of the package's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, metavar="OUT", help="write the full report as JSON here")
    p.add_argument("--plot", type=Path, metavar="PNG", help="accuracy along the stream (needs matplotlib)")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from . import evaluate

    if not args.test and not args.crop_test:
        raise UsageError("give at least one --test or --crop-test folder")
    with tempfile.TemporaryDirectory(prefix="infantino-eval-") as tmp:
        state = Path(tmp) / "state"
        if args.state_dir is not None:
            if not Path(args.state_dir).is_dir():
                raise ValueError(f"state folder {args.state_dir} does not exist")
            shutil.copytree(args.state_dir, state, ignore=shutil.ignore_patterns("queue", "sync", ".lock", "*.tmp", "consent*"))
        config = _config(args, autosave=False, seed=args.seed, replay_seed=str(args.replay_seed) if args.replay_seed else None)
        model_dir = args.model_dir
        if model_dir is None and args.state_dir is not None:  # the package that device runs (sync may manage it)
            from .paths import model_dir_for

            model_dir = model_dir_for(args.state_dir)
        device = Device(model_dir, state, config)
        tests = [evaluate.embed_folder(device, d, detect=not args.no_face_detect) for d in args.test]
        tests += [evaluate.embed_folder(device, d, detect=False) for d in args.crop_test]
        head = {"package": {"path": str(device.package.folder), "version": device.package.version,
                            "extractor": device.extractor_role, "source_samples": len(device.source)},
                "seed": args.seed, "config": asdict(config)}
        if args.stream is None:
            report = {**head, **evaluate.static_report(device, tests)}
            for t in report["tests"]:
                print(f"{t['path']} (n={t['n']}): accuracy {t['accuracy']:.3f}, macro-F1 {t['macro_f1']:.3f}")
        else:
            print(f"streaming {args.stream} (seed {args.seed}) through predict + learn ...", file=sys.stderr)
            report = {**head, **evaluate.stream_report(device, args.stream, tests, args.seed, log=lambda m: print(m, file=sys.stderr))}
            for t in report["tests"]:
                print(f"{t['path']} (n={t['n']}): accuracy {t['accuracy_before']:.3f} -> {t['accuracy_after']:.3f}, "
                      f"macro-F1 {t['macro_f1_before']:.3f} -> {t['macro_f1_after']:.3f}")
            s = report["stream"]
            print(f"stream {s['path']} (n={s['n']}): accuracy before each label {s['prequential_accuracy']:.3f}; "
                  f"{s['updates']} updates, {s['rollbacks']} rolled back, {s['held_out']} kept back for the guard")
            if s["first_half_accuracy_at_half"] is not None:
                print(f"labels of the stream's first half known: {s['first_half_accuracy_at_half']:.3f} at half-way, "
                      f"{s['first_half_accuracy_at_end']:.3f} at the end")
            print(f"predict {report['predict_ms_p50']:.1f} ms p50 / {report['predict_ms_p95']:.1f} ms p95; "
                  f"learn {report['learn_ms_p50']:.2f} ms p50 / {report['learn_ms_p95']:.2f} ms p95 (cached embedding, unsaved); "
                  f"save {report['save_ms']:.1f} ms")
            if args.plot and not evaluate.plot_curve(report, args.plot):
                print("matplotlib is not installed: no plot written", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


# --------------------------------------------------------------------------- sync


def add_sync(sub) -> None:
    p = sub.add_parser("sync", help="push learned head updates to the sync server, pull the current model")
    p.add_argument("--server", required=True, metavar="URL", help="sync server, e.g. http://10.0.0.5:8080")
    p.add_argument("--token", default=os.environ.get("INFANTINO_DEVICE_TOKEN"), metavar="T",
                   help="this device's token (default: $INFANTINO_DEVICE_TOKEN)")
    _device_options(p)
    p.add_argument("--timeout", type=float, default=15.0, help="seconds per request (default: %(default)s)")
    p.add_argument("--retries", type=int, default=4, help="retries per request, with backoff (default: %(default)s)")
    p.add_argument("--share-crops", action=argparse.BooleanOptionalAction, default=None,
                   help="consent (or, with --no-share-crops, withdraw it and delete waiting crops) to upload labelled "
                        "face crops for fine-tuning; remembered in the state folder (default: as last chosen, off)")
    p.add_argument("--json", action="store_true", help="print the sync report as JSON")
    p.set_defaults(func=run_sync)


def run_sync(args: argparse.Namespace) -> int:
    from .sync.client import sync_device
    from .sync.state import managed_model_dir

    if not args.token:
        raise UsageError("give --token or set INFANTINO_DEVICE_TOKEN")
    state = args.state_dir if args.state_dir is not None else default_state_dir()
    model = args.model_dir if args.model_dir is not None else managed_model_dir(state)
    device = Device(model, state, _config(args, share_crops=args.share_crops))
    report = sync_device(device, args.server, args.token, timeout_s=args.timeout, retries=args.retries)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(f"pushed {report.pushed} update(s) ({report.duplicates} already known), {len(report.rejected)} refused, "
              f"{report.pending} waiting; package {report.package_version}{' (new)' if report.package_changed else ''}, "
              f"head {report.head_version}{' (adopted, ' + str(report.replayed) + ' samples replayed)' if report.head_changed else ''}"
              f"{f'; {report.crops_sent} consented crop(s) uploaded' if report.crops_sent else ''}"
              f"{f'; {report.crops_erased} uploaded crop(s) erased on the server' if report.crops_erased else ''}")
        for status, reason in report.rejected:
            print(f"refused ({status}): {reason}", file=sys.stderr)
    if report.error:
        raise RuntimeError(f"sync incomplete, will resume next time: {report.error}")
    return 0


# --------------------------------------------------------------------------- consent


def add_consent(sub) -> None:
    p = sub.add_parser("consent", help="show or set whether labelled face crops may be uploaded at sync (off by default)")
    p.add_argument("choice", nargs="?", choices=["on", "off"], help="on: share labelled crops from now on; off: stop and delete waiting ones")
    p.add_argument("--erase", action="store_true", help="with off: also have the server delete the crops it already "
                                                         "holds from this device (at the next sync)")
    p.add_argument("--state-dir", type=Path, default=None, help=f"device state folder (default: {default_state_dir()})")
    p.set_defaults(func=run_consent)


def run_consent(args: argparse.Namespace) -> int:
    from .consent import CropOutbox, record_consent

    state = args.state_dir if args.state_dir is not None else default_state_dir()
    if args.erase and args.choice != "off":
        raise UsageError("--erase goes with off")
    if args.choice is not None:
        record_consent(state, args.choice == "on", erase=args.erase)
    outbox = CropOutbox(state)
    share = outbox.shared()
    print(f"share labelled face crops: {'on' if share else 'off'}; {len(outbox)} waiting to be uploaded"
          f"{f', {outbox.dropped} older ones dropped (outbox full)' if outbox.dropped else ''}"
          f"{'; the server will be asked to delete the uploaded ones at the next sync' if outbox.erase_pending() else ''}")
    return 0


# --------------------------------------------------------------------------- annotate


def add_annotate(sub) -> None:
    p = sub.add_parser("annotate", help="serve the caregiver annotation page (needs the [annotate] extra)")
    _device_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port (default: %(default)s)")
    p.add_argument("--token", default=os.environ.get("INFANTINO_ANNOTATE_TOKEN"), metavar="T",
                   help="PIN/token the page asks for (default: $INFANTINO_ANNOTATE_TOKEN; made up when bound beyond loopback)")
    p.set_defaults(func=run_annotate)


def run_annotate(args: argparse.Namespace) -> int:
    try:
        from .annotate import serve
    except ImportError as exc:
        raise RuntimeError(f"the annotation page needs Flask: pip install 'infantino-edge[annotate]' ({exc})") from exc
    serve(Device(args.model_dir, args.state_dir, _config(args)), args.host, args.port, args.token)
    return 0


# --------------------------------------------------------------------------- watch


def add_watch(sub) -> None:
    from .watch.cli import add_arguments, run

    p = sub.add_parser("watch", help="run on a camera, stream, video file or image folder: timeline, queue, alerts, sync")
    add_arguments(p)
    _device_options(p)
    p.set_defaults(threads=1, func=lambda args: run(args, _config(args), PROG))  # one ONNX thread leaves a core to the reader


# --------------------------------------------------------------------------- main

SUBCOMMANDS: list[Callable] = [add_predict, add_learn, add_queue, add_evaluate, add_sync, add_consent, add_annotate, add_watch]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="InfantinO Edge device runtime: predict, learn, queue, evaluate.")
    add_verbose(parser)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for add in SUBCOMMANDS:
        add(sub)
    for choice in sub.choices.values():
        add_verbose(choice, top=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format=f"{PROG}: %(message)s")
    return run_command(PROG, lambda: args.func(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
