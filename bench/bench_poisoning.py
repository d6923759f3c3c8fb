"""Poisoning: honest devices against one hostile token (or ten), each strategy, head gate off/on.

    python bench/bench_poisoning.py [--package data/models] [--seeds 0,1,2] [--rounds 4]
                                    [--strategies trimmed_mean,median,fedavg] [--gate both|on|off]
                                    [--label after] [--out bench/results/poisoning.json]

The set-up of ``bench_federated.py``'s product path: a real ``infantino-server run`` (gunicorn,
2 workers), 9 real ``Device`` objects, each learning its own stratified share of the infant
photos in ``--rounds`` chunks and syncing through ``sync_device`` (push delta, pull, adopt,
replay). The photos are split per seed into 25 % test (never seen), 15 % the server's held-out
gate set (``INFANTINO_GATE_DIRS``, used only with the gate on) and 60 % for the devices.

The attack is issue 14's: a delta of zeros with ``intercept_1[happy] = 49.9`` (inside the old
norm bound of 50), ``n_samples = 100000``, a fresh idempotency key for every post, based on the
head being served. Per round: the devices learn and sync, the attacker posts, the server
aggregates (admin endpoint), the devices sync again. Reported: the served head's accuracy on
the test photos after the last round, and what the server did with the hostile posts.

``--label before`` with ``PYTHONPATH`` pointing at a checkout of the old code measures that
code with its own default (run from that checkout: ``--strategies default --gate off``).
The package's bootstrap head must not have been fitted on these photos (the results in
``bench/results/poisoning.json`` use ``efficientnet_lite0-e3-dcd63f1a``, whose head saw FER only).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

from bench_federated import accuracy, find_package, load_faces  # noqa: E402

HONEST = 9
ATTACKS = {"honest": (0, 0), "1 token x 1": (1, 1), "1 token x 10": (1, 10), "10 tokens x 1": (10, 1)}
HAPPY = 3  # FER2013 order


def crafted_body(name: str, info: dict, shapes: list[tuple[int, ...]], classes: list[str]) -> bytes:
    from infantino.edge_runtime.core import wire

    layers = [np.zeros(s, np.float32) for s in shapes]
    layers[-1][classes.index("happy")] = 49.9
    return wire.encode_update(device=name, base_head_version=info["head_version"], base_package_version=info["package_version"],
                              layers=layers, n_samples=100000, idempotency_key=uuid.uuid4().hex, kind="delta")


def attack(url: str, tokens: dict[str, str], posts: int, shapes: list, classes: list[str]) -> list[int]:
    """Every hostile token posts ``posts`` crafted updates on the served head; returns the statuses."""
    from infantino.edge_runtime.core import wire
    from infantino.edge_runtime.sync.transport import Http

    statuses = []
    for name, token in tokens.items():
        http = Http(url, token, retries=0)
        info = http.request("GET", "/v1/model").json()
        for _ in range(posts):
            resp = http.request("POST", "/v1/updates", body=crafted_body(name, info, shapes, classes),
                                headers={"Content-Type": wire.CONTENT_TYPE})
            statuses.append(resp.status)
    return statuses


def write_gate_folder(crops: list[np.ndarray], labels: np.ndarray, classes: list[str], folder: Path) -> Path:
    """The gate split as an ImageFolder of the 64x64 face crops (read back unchanged by the gate)."""
    from PIL import Image

    for i, (crop, y) in enumerate(zip(crops, labels)):
        (folder / classes[int(y)]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(crop).save(folder / classes[int(y)] / f"{i:04d}.png")
    return folder


def _server_env(strategy: str, gate_dir: Path | None) -> dict:
    env = {}
    if strategy != "default":
        env["INFANTINO_STRATEGY"] = json.dumps({"rule": strategy})
    if gate_dir is not None:
        env["INFANTINO_GATE_DIRS"] = str(gate_dir)
    return env


def _devices(package: Path, faces: dict, work: Path, seed: int, rounds: int):
    from infantino.edge_runtime.device import Device, DeviceConfig
    from infantino.edge_runtime.sync.client import DeviceLearner

    config = DeviceConfig(detect_faces=False, seed=seed)
    learners, chunks = {}, {}
    for i in range(HONEST):
        learners[f"cam{i}"] = DeviceLearner(Device(package, work / "states" / f"cam{i}", config))
        crops, labels = faces[f"dev{i}"]
        order = np.random.default_rng(seed + i).permutation(len(labels))
        chunks[f"cam{i}"] = [[(crops[j], int(labels[j])) for j in part] for part in np.array_split(order, rounds)]
    return learners, chunks


def run(package: Path, faces: dict, x_test: np.ndarray, strategy: str, scenario: str, gate_dir: Path | None,
        work: Path, seed: int, rounds: int) -> dict:
    """One fleet: 9 honest devices, the scenario's attackers, ``rounds`` rounds; the served head's test accuracy."""
    from infantino.edge_runtime.core.head import OnlineHead
    from infantino.edge_runtime.sync.client import sync_device
    from infantino.edge_runtime.sync.transport import Http
    from infantino.sync_server import store as st
    from infantino.sync_server.process import ServerProcess, served_store

    data = work / "server"
    data.mkdir(parents=True)
    store = served_store(st.sqlite_url(data / "server.db"), data, package)
    tokens = {f"cam{i}": store.add_client(f"cam{i}") for i in range(HONEST)}
    n_tokens, posts = ATTACKS[scenario]
    hostile = {f"mallory{i}": store.add_client(f"mallory{i}") for i in range(n_tokens)}
    admin = store.rotate_admin()
    learners, chunks = _devices(package, faces, work, seed, rounds)
    boot = store.head(store.serving().head_version)
    classes = list(store.serving().manifest["classes"])
    statuses, refused_rounds = [], 0
    with ServerProcess(data, aggregate_k=10_000, env=_server_env(strategy, gate_dir)) as server:
        for name, learner in learners.items():
            sync_device(learner, server.url, tokens[name])
        for r in range(rounds):
            for name, learner in learners.items():
                for crop, label in chunks[name][r]:
                    learner.learn(crop, label)
                sync_device(learner, server.url, tokens[name])
            statuses += attack(server.url, hostile, posts, boot.shapes, classes)
            answer = Http(server.url, admin).request("POST", "/v1/admin/aggregate", body=b"{}",
                                                     headers={"Content-Type": "application/json"}).json()
            refused_rounds += int(answer.get("served") is False)
            for name, learner in learners.items():
                sync_device(learner, server.url, tokens[name])
    final = OnlineHead.from_bytes(store.head(store.serving().head_version).blob)
    store.dispose()
    y_test = faces["test"][1]
    return {"accuracy": accuracy(final, x_test, y_test), "hostile_posts": len(statuses),
            "hostile_accepted": sum(s == 202 for s in statuses), "rounds_refused_by_gate": refused_rounds,
            "head_version": final.version}


def _test_embeddings(package: Path, faces: dict) -> np.ndarray:
    from infantino.edge_runtime.core.extractor import Extractor
    from infantino.edge_runtime.core.package import open_package
    from infantino.edge_runtime.core.preprocess import faces_tensor

    pkg = open_package(package)
    role = "extractor_int8" if pkg.has("extractor_int8") else "extractor"
    return Extractor(pkg.path(role))(faces_tensor(faces["test"][0], pkg.manifest.preprocess))


def bench(package: Path, seeds: list[int], rounds: int, strategies: list[str], gates: list[bool], work: Path) -> dict:
    from infantino.edge_runtime.core.package import open_package

    t0 = time.perf_counter()
    faces_by_seed = load_faces(package, seeds, HONEST, held_out={"test": 0.25, "gate": 0.15})
    print(f"cropped the photos in {time.perf_counter() - t0:.0f} s")
    classes = list(open_package(package).manifest.classes)
    runs = []
    for seed in seeds:
        faces = faces_by_seed[seed]
        x_test = _test_embeddings(package, faces)
        gate_dir = write_gate_folder(*faces["gate"], classes, work / f"gate-{seed}")
        for strategy in strategies:
            for gate in gates:
                for scenario in ATTACKS:
                    t1 = time.perf_counter()
                    r = run(package, faces, x_test, strategy, scenario, gate_dir if gate else None,
                            work / f"s{seed}-{strategy}-{int(gate)}-{scenario.replace(' ', '')}", seed, rounds)
                    runs.append({"seed": seed, "strategy": strategy, "gate": gate, "scenario": scenario, **r})
                    print(f"seed {seed} {strategy:12} gate {'on ' if gate else 'off'} {scenario:14} "
                          f"acc {r['accuracy']:.3f}  hostile accepted {r['hostile_accepted']}/{r['hostile_posts']}  "
                          f"refused rounds {r['rounds_refused_by_gate']}  ({time.perf_counter() - t1:.0f} s)", flush=True)
    return {"n_test": int(len(faces_by_seed[seeds[0]]["test"][1])), "n_gate": int(len(faces_by_seed[seeds[0]]["gate"][1])),
            "runs": runs, "table": summarize(runs)}


def summarize(runs: list[dict]) -> list[dict]:
    """Mean accuracy per (strategy, gate, scenario), and the change against the honest-only fleet."""
    rows = []
    for key in sorted({(r["strategy"], r["gate"]) for r in runs}):
        mine = [r for r in runs if (r["strategy"], r["gate"]) == key]
        honest = float(np.mean([r["accuracy"] for r in mine if r["scenario"] == "honest"]))
        row = {"strategy": key[0], "gate": key[1]}
        for scenario in ATTACKS:
            accs = [r["accuracy"] for r in mine if r["scenario"] == scenario]
            row[scenario] = {"mean": float(np.mean(accs)), "delta": float(np.mean(accs)) - honest, "per_seed": accs}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--package")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--strategies", default="trimmed_mean,median,fedavg", help="rules, or 'default' for the server's own")
    p.add_argument("--gate", choices=("both", "on", "off"), default="both")
    p.add_argument("--label", default="after")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "poisoning.json"))
    args = p.parse_args(argv)
    package = find_package(args.package)
    gates = {"both": [False, True], "on": [True], "off": [False]}[args.gate]
    work = Path(tempfile.mkdtemp(prefix="infantino-poison-"))
    try:
        result = bench(package, [int(s) for s in args.seeds.split(",")], args.rounds, args.strategies.split(","), gates, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nheld-out accuracy after {args.rounds} rounds (n={result['n_test']}), mean of seeds {args.seeds}; "
          "change against the honest fleet in brackets")
    print(f"{'strategy':12} {'gate':4} " + " ".join(f"{s:>20}" for s in ATTACKS))
    for row in result["table"]:
        print(f"{row['strategy']:12} {'on' if row['gate'] else 'off':4} "
              + " ".join(f"{row[s]['mean']:>12.3f} ({row[s]['delta']:+.3f})" for s in ATTACKS))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    from infantino.edge_runtime.core.package import open_package

    previous[args.label] = {"package": str(package), "package_version": open_package(package).version, "seeds": args.seeds,
                            "rounds": args.rounds, **result}
    out.write_text(json.dumps(previous, indent=1) + "\n")
    print(f"wrote {out} ({args.label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
