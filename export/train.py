"""Train the expression network on FER2013 (plus optional ImageFolder photos).

Checkpoints every epoch (atomically) and resumes from the last one, so a long CPU run
can be stopped and continued across sessions. Writes metrics JSON, training curves and
a confusion matrix; logs to MLflow when a tracking URI is given.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from infantino.edge_runtime.core.atomic import atomic_write_text, atomic_write_with
from infantino.edge_runtime.core.metrics import summarize
from infantino.edge_runtime.core.preprocess import CLASSES, DEFAULT_SPEC, PreprocessSpec, normalize
from infantino.edge_runtime.core.splits import stratified_split

from .augment import AugmentConfig, augment
from .data import FaceSet, load_fer, load_image_folder
from .from_onnx import freeze_batchnorm
from .model import ExpressionNet, ModelConfig, build_model
from .plots import plot_confusion, plot_curves

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    fer: str
    out: str
    images: list[str] = field(default_factory=list)
    arch: str = "efficientnet_lite0"
    imagenet_init: bool = True
    init_from: Optional[str] = None
    epochs: int = 30
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    mixup: float = 0.0  # Beta(a, a) mixing of batch pairs (Zhang et al. 2018); 0: off
    ema_decay: float = 0.998
    val_fraction: float = 0.1
    seed: int = 0  # initialisation, order, augmentation, mixup
    split_seed: int = 0  # the FER held-out split: fixed, so that other seeds never train on the faces packages score on
    threads: int = 2
    limit: Optional[int] = None
    max_steps_per_epoch: Optional[int] = None
    images_repeat: int = 1
    mlflow_uri: Optional[str] = None
    detector: Optional[str] = None  # folder written by `infantino-export detector`: BlazeFace crops the --images photos
    preprocess: dict = field(default_factory=dict)  # PreprocessSpec overrides (face_margin, align_eyes, ...) for --images


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """Inverse-square-root frequency weights, mean 1: eases imbalance without wrecking accuracy."""
    counts = np.bincount(labels, minlength=n_classes).astype(float)
    w = 1.0 / np.sqrt(np.maximum(counts, 1.0))
    return torch.tensor(w / w.mean(), dtype=torch.float32)


@torch.no_grad()
def predict_logits(net: torch.nn.Module, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits for uint8 crops, normalised by the device's own ``normalize``."""
    net.eval()
    out = []
    for i in range(0, len(pixels), batch_size):
        x = torch.from_numpy(normalize(pixels[i : i + batch_size], DEFAULT_SPEC)).contiguous(memory_format=torch.channels_last)
        out.append(net(x).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(CLASSES)), np.float32)


def evaluate(net: torch.nn.Module, data: FaceSet) -> dict:
    logits = predict_logits(net, data.pixels)
    loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(data.labels)).item())
    return {"loss": loss, **summarize(data.labels, logits.argmax(1), len(CLASSES))}


def split_data(cfg: TrainConfig) -> tuple[FaceSet, FaceSet]:
    """FER train/validation split (seeded, stratified) plus any ImageFolder photos in train."""
    fer = load_fer(cfg.fer, DEFAULT_SPEC, limit=cfg.limit)
    keep, held = stratified_split(fer.labels, cfg.val_fraction, cfg.split_seed)
    train = fer.subset(keep)
    finder = image_finder(cfg)
    extra = [load_image_folder(d, finder.spec, finder=finder) for d in cfg.images]
    if extra:
        train = FaceSet.concat([train] + extra * cfg.images_repeat)
    return train, fer.subset(held)


def training_spec(cfg: TrainConfig) -> PreprocessSpec:
    """The spec the --images photos are cropped with (and the package built from this run keeps)."""
    from infantino.edge_runtime.core.facefinder import detector_spec

    base = detector_spec(cfg.detector) if cfg.detector else DEFAULT_SPEC
    return PreprocessSpec.from_dict({**base.to_dict(), **cfg.preprocess})


def image_finder(cfg: TrainConfig):
    from infantino.edge_runtime.core.facefinder import FaceFinder, detector_file

    spec = training_spec(cfg)
    return FaceFinder.from_file(spec, detector_file(cfg.detector) if cfg.detector else None)


def start_network(cfg: TrainConfig) -> ExpressionNet:
    """ImageNet-initialised (or blank) for a first run; the given checkpoint or package for fine-tuning.

    From a package (its fp32 ONNX extractor) BatchNorm is folded, so it stays frozen, and the
    7-class layer is fitted to the package's FER embeddings first."""
    if not cfg.init_from:
        return build_model(ModelConfig(arch=cfg.arch), imagenet_init=cfg.imagenet_init)
    if Path(cfg.init_from).is_dir():
        from .from_onnx import fit_classifier, net_from_onnx

        net = net_from_onnx(Path(cfg.init_from) / "extractor.onnx")
        fer = load_fer(cfg.fer, DEFAULT_SPEC, limit=cfg.limit)
        keep, _ = stratified_split(fer.labels, cfg.val_fraction, cfg.split_seed)
        sample = np.random.default_rng(cfg.seed).choice(keep, size=min(8000, len(keep)), replace=False)
        with torch.no_grad():
            emb = torch.cat([net.embedding(torch.from_numpy(normalize(fer.pixels[sample[i : i + 512]], DEFAULT_SPEC)))
                             for i in range(0, len(sample), 512)]).numpy()
        fit_classifier(net, emb, fer.labels[sample])
        net.frozen_batchnorm = True
        return net
    net, _ = load_checkpoint(cfg.init_from)
    return net


class _Ema:
    """Exponential moving average of weights and BN buffers (evaluated and exported)."""

    def __init__(self, net: torch.nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(net).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, m in zip(self.model.state_dict().values(), net.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(m.detach(), alpha=1 - d)
            else:
                e.copy_(m)


def _mlflow_run(cfg: TrainConfig, run_id: Optional[str]):
    if not cfg.mlflow_uri:
        return None
    import mlflow

    mlflow.set_tracking_uri(cfg.mlflow_uri)
    mlflow.set_experiment("infantino-extractor-training")
    run = mlflow.start_run(run_id=run_id)
    if run_id is None:
        mlflow.log_params({k: v for k, v in asdict(cfg).items() if k not in ("out",)})
    return run


@dataclass
class _Job:
    """One training run's moving parts, resumed from the checkpoint when there is one."""

    net: torch.nn.Module
    model_cfg: ModelConfig
    frozen_bn: bool
    steps: int  # per epoch
    opt: torch.optim.Optimizer
    ema: _Ema
    weights: torch.Tensor  # class weights of the loss
    history: list[dict]
    start_epoch: int
    run_id: Optional[str]
    sched: object = None
    run: object = None  # the MLflow run, if any


def _resume(ckpt_path: Path, net: torch.nn.Module, ema: _Ema, opt: torch.optim.Optimizer) -> tuple[list[dict], int, Optional[str]]:
    """Load the checkpoint's weights and optimizer state; returns (history, first epoch to run, MLflow run id)."""
    if not ckpt_path.exists():
        return [], 1, None
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    net.load_state_dict(state["model"])
    ema.model.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    start_epoch = state["epoch"] + 1
    print(f"resuming from {ckpt_path} at epoch {start_epoch}")
    return state["history"], start_epoch, state.get("mlflow_run_id")


def _start(cfg: TrainConfig, ckpt_path: Path, train_labels: np.ndarray) -> _Job:
    net = start_network(cfg)
    model_cfg, frozen_bn = net.config, bool(getattr(net, "frozen_batchnorm", False))
    net = net.train().to(memory_format=torch.channels_last)
    steps = int(np.ceil(len(train_labels) / cfg.batch_size))
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = _Ema(net, cfg.ema_decay)
    weights = class_weights(train_labels, len(CLASSES))
    job = _Job(net, model_cfg, frozen_bn, steps, opt, ema, weights, *_resume(ckpt_path, net, ema, opt))
    # Built after a resume so that a larger --epochs stretches the remaining schedule.
    job.sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.lr, total_steps=max(cfg.epochs, job.start_epoch - 1) * steps, pct_start=0.15,
        last_epoch=(job.start_epoch - 1) * steps - 1,
    )
    return job


def mix_plan(n: int, alpha: float, g: torch.Generator) -> tuple[float, torch.Tensor | None]:
    """Mixup's weight and partner order for one batch (no partner when off): soft targets for ambiguous labels."""
    if alpha <= 0 or n < 2:
        return 1.0, None
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return max(lam, 1.0 - lam), torch.randperm(n, generator=g)


def _train_epoch(job: _Job, cfg: TrainConfig, pixels: torch.Tensor, labels: torch.Tensor, epoch: int,
                 g: torch.Generator) -> tuple[float, float]:
    """One pass over the shuffled training set; returns (mean loss, accuracy) on the augmented batches."""
    order = torch.randperm(len(labels), generator=g)
    seen, correct, loss_sum = 0, 0, 0.0
    bar = tqdm(range(job.steps), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", mininterval=5)
    for step in bar:
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        x = augment(pixels[idx], g, AugmentConfig()).contiguous(memory_format=torch.channels_last)
        y = labels[idx]
        lam, perm = mix_plan(len(y), cfg.mixup, g)
        if perm is not None:
            x = lam * x + (1.0 - lam) * x[perm]
        logits = job.net(x)

        def criterion(target: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits, target, weight=job.weights, label_smoothing=cfg.label_smoothing)

        loss = criterion(y) if perm is None else lam * criterion(y) + (1.0 - lam) * criterion(y[perm])
        job.opt.zero_grad(set_to_none=True)
        loss.backward()
        job.opt.step()
        job.sched.step()
        job.ema.update(job.net, (epoch - 1) * job.steps + step)
        seen += len(y)
        correct += int((logits.argmax(1) == y).sum())
        loss_sum += loss.item() * len(y)
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    return loss_sum / seen, correct / seen


def _end_epoch(job: _Job, cfg: TrainConfig, out: Path, epoch: int, fit: tuple[float, float], val: dict, t0: float) -> None:
    """Record the epoch: history, checkpoint (atomically), curves, MLflow."""
    job.history.append({
        "epoch": epoch, "train_loss": fit[0], "train_accuracy": fit[1],
        "val_loss": val["loss"], "val_accuracy": val["accuracy"], "val_macro_f1": val["macro_f1"],
        "lr": job.sched.get_last_lr()[0], "seconds": time.time() - t0,
    })
    print(f"epoch {epoch}: val accuracy {val['accuracy']:.4f} macro-F1 {val['macro_f1']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    state = {
        "model": job.net.state_dict(), "ema": job.ema.model.state_dict(), "optimizer": job.opt.state_dict(),
        "epoch": epoch, "history": job.history,
        "model_config": job.model_cfg.to_dict(), "train_config": asdict(cfg), "preprocess": training_spec(cfg).to_dict(),
        "mlflow_run_id": job.run.info.run_id if job.run else None,
    }
    atomic_write_with(out / CHECKPOINT, lambda fh: torch.save(state, fh))
    plot_curves(job.history, out / "training_curves.png")
    if job.run:
        import mlflow

        mlflow.log_metrics({k: v for k, v in job.history[-1].items() if k != "epoch"}, step=epoch)


def _finish(job: _Job, cfg: TrainConfig, out: Path, n_train: int, val_set: FaceSet) -> dict:
    """Score the EMA network once more; write metrics.json and the confusion matrix, close the MLflow run."""
    final = evaluate(job.ema.model, val_set)
    plot_confusion(np.array(final["confusion"]), CLASSES, out / "confusion_matrix.png", f"FER validation (n={final['n']})")
    metrics = {
        "arch": cfg.arch, "epochs": cfg.epochs, "val_accuracy": final["accuracy"], "val_macro_f1": final["macro_f1"],
        "val": final, "history": job.history, "n_train": n_train, "n_val": len(val_set), "seed": cfg.seed,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    if job.run:
        import mlflow

        mlflow.log_metrics({"final_val_accuracy": final["accuracy"], "final_val_macro_f1": final["macro_f1"]})
        for name in ("metrics.json", "training_curves.png", "confusion_matrix.png"):
            mlflow.log_artifact(str(out / name))
        mlflow.end_run()
    return metrics


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training; returns the final metrics dict written to metrics.json."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)

    train_set, val_set = split_data(cfg)
    job = _start(cfg, out / CHECKPOINT, train_set.labels)
    job.run = _mlflow_run(cfg, job.run_id)
    pixels = torch.from_numpy(train_set.pixels)
    labels = torch.from_numpy(train_set.labels)
    for epoch in range(job.start_epoch, cfg.epochs + 1):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        job.net.train()
        if job.frozen_bn:
            freeze_batchnorm(job.net)
        t0 = time.time()
        fit = _train_epoch(job, cfg, pixels, labels, epoch, g)
        _end_epoch(job, cfg, out, epoch, fit, evaluate(job.ema.model, val_set), t0)
    return _finish(job, cfg, out, len(train_set), val_set)


def average_checkpoints(sources: list[str | Path], dest: str | Path) -> None:
    """One checkpoint holding the weight average of fine-tunes that started from the same network
    (a "model soup", Wortsman et al. 2022): seeds disagree by several points on a few hundred
    infant photos, their average need not. Buffers that are not floats come from the first."""
    states = [torch.load(p, map_location="cpu", weights_only=False) for p in sources]
    for p, s in zip(sources[1:], states[1:]):
        if any(s[key].keys() != states[0][key].keys() or any(s[key][n].shape != t.shape for n, t in states[0][key].items())
               for key in ("model", "ema")):
            raise ValueError(f"{p} does not hold the same network as {sources[0]}: only fine-tunes of one network average")
    soup = dict(states[0], history=[], soup_of=[str(p) for p in sources])
    for key in ("model", "ema"):
        soup[key] = {n: torch.stack([s[key][n] for s in states]).mean(0) if t.is_floating_point() else t
                     for n, t in states[0][key].items()}
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(Path(dest), lambda fh: torch.save(soup, fh))


def load_checkpoint(path: str | Path) -> tuple[ExpressionNet, dict]:
    """The EMA network of a checkpoint (eval mode) and the checkpoint's metadata."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    net = ExpressionNet(ModelConfig(**state["model_config"]))
    net.load_state_dict(state["ema"])
    return net.eval(), state
