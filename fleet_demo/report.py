"""Round tables, summary JSON and plots of a demo run (matplotlib optional)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from infantino.edge_runtime.core.atomic import atomic_write_text
from infantino.edge_runtime.core.preprocess import CLASSES

from .fleet import RoundRecord


def header(n_devices: int) -> str:
    cams = " ".join(f"cam{i + 1:<3d}" for i in range(n_devices))
    return f"{'arm':11s} {'round':>5s} {'labels':>6s}  {cams}  {'global':>6s} {'F1':>5s}  head  package"


def row(arm: str, r: RoundRecord) -> str:
    cams = " ".join(f"{a:6.3f}" for a in r.device_accuracy)
    note = ""
    if r.gate is not None:
        note = "  <- refreshed extractor published: " + ("promoted" if r.gate.get("promoted") else "refused by the gate")
    return (f"{arm:11s} {r.round:5d} {r.labels_spent:6d}  {cams}  {r.global_accuracy:6.3f} {r.global_macro_f1:5.3f}  "
            f"{r.head_version:4d}  {r.package_version}{note}")


def write_summary(out: Path, arms: dict[str, list[RoundRecord]], settings: dict) -> Path:
    summary = {"settings": settings, "arms": {arm: [asdict(r) for r in recs] for arm, recs in arms.items()}}
    final = {arm: recs[-1].global_accuracy for arm, recs in arms.items()}
    summary["final_global_accuracy"] = final
    summary["initial_global_accuracy"] = {arm: recs[0].global_accuracy for arm, recs in arms.items()}
    summary["classes"] = list(CLASSES)
    summary["final_confusion"] = {arm: recs[-1].global_confusion for arm, recs in arms.items()}  # rows: true class
    summary["refresh"] = {arm: {"after_round": r.round, "promoted": r.refreshed, "held_out_before": r.gate["held_out_before"],
                                "held_out_after": r.global_accuracy}
                          for arm, recs in arms.items() for r in recs if r.gate is not None}
    path = out / "summary.json"
    atomic_write_text(path, json.dumps(summary, indent=1, default=str))
    return path


def plot(out: Path, arms: dict[str, list[RoundRecord]]) -> list[Path]:
    """accuracy_over_rounds.png (global per arm, devices of the first arm) and confusion.png."""
    try:
        from infantino.export.plots import pyplot, plot_confusion

        plt = pyplot()
    except ImportError:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.2))
    first = next(iter(arms))
    for arm, recs in arms.items():
        x = [r.labels_spent for r in recs]
        ax.plot(x, [r.global_accuracy for r in recs], marker="o", lw=2, label=f"global head ({arm} labelling)")
    recs = arms[first]
    x = [r.labels_spent for r in recs]
    devs = np.array([r.device_accuracy for r in recs])
    for i in range(devs.shape[1]):
        ax.plot(x, devs[:, i], lw=0.8, alpha=0.6, ls="--", label=f"camera {i + 1}, own held-out frames ({first})")
    for r in recs:
        if r.refreshed:
            ax.axvline(r.labels_spent, color="grey", lw=1, ls=":")
            ax.text(r.labels_spent, ax.get_ylim()[0], " refreshed extractor", rotation=90, va="bottom", fontsize=8)
    ax.set_xlabel("caregiver labels spent (whole fleet)")
    ax.set_ylabel("accuracy (global: balanced held-out photos)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths = [out / "accuracy_over_rounds.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)
    final = recs[-1]
    paths.append(out / "confusion.png")
    plot_confusion(np.array(final.global_confusion), CLASSES, paths[1],
                   title=f"global head after round {final.round} ({first} labelling)")
    return paths
