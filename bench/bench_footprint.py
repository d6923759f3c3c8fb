"""Install footprint of each extra: what a device (``.[edge]``) carries versus a workstation (``.[export]``).

Resolves each extra's dependency closure from the installed distributions' metadata
(requirements with their markers) and sums the installed file sizes from each
distribution's RECORD. No network, no new environment: it measures what pip put here.

    python bench/bench_footprint.py [--extras edge export server] [--out bench/results/footprint.json] [--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "infantino-edge"
RESULTS = Path(__file__).parent / "results"


def _requirements(dist: str, extras: set[str]) -> list[Requirement]:
    out = []
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        env_extras = extras or {""}
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in env_extras):
            out.append(req)
    return out


def closure(extra: str) -> dict[str, set[str]]:
    """{distribution name: extras asked of it} for everything ``PROJECT[extra]`` pulls in (itself excluded)."""
    seen: dict[str, set[str]] = {}
    stack = [(PROJECT, {extra})]
    while stack:
        name, extras = stack.pop()
        key = canonicalize_name(name)
        if key in seen and extras <= seen[key]:
            continue
        seen.setdefault(key, set()).update(extras)
        try:
            reqs = _requirements(name, extras)
        except metadata.PackageNotFoundError:
            continue  # not installed here (e.g. a platform-specific dependency)
        stack.extend((r.name, set(r.extras)) for r in reqs)
    seen.pop(canonicalize_name(PROJECT), None)
    return seen


def installed_bytes(name: str) -> int:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return 0
    total = 0
    for f in dist.files or []:
        if f.size is not None:
            total += int(f.size)
        else:
            path = Path(dist.locate_file(f))
            total += path.stat().st_size if path.is_file() else 0
    return total


def footprint(extra: str) -> dict:
    sizes = {name: installed_bytes(name) for name in sorted(closure(extra))}
    top = sorted(sizes.items(), key=lambda kv: -kv[1])[:8]
    return {"extra": extra, "packages": len(sizes), "megabytes": round(sum(sizes.values()) / 1e6, 1),
            "top": [{"name": n, "megabytes": round(b / 1e6, 1)} for n, b in top], "all": sizes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extras", nargs="+", default=["edge", "export", "server"])
    p.add_argument("--out", type=Path, default=RESULTS / "footprint.json")
    p.add_argument("--quick", action="store_true", help="CI size: the edge and export extras only")
    args = p.parse_args(argv)
    if args.quick:
        args.extras = ["edge", "export"]
    rows = [footprint(e) for e in args.extras]
    print(f"{'extra':8s} {'packages':>8s} {'MB':>8s}   largest")
    for r in rows:
        print(f"{r['extra']:8s} {r['packages']:8d} {r['megabytes']:8.1f}   "
              + ", ".join(f"{t['name']} {t['megabytes']:.0f}" for t in r["top"][:5]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"python": sys.version.split()[0], "extras": rows}, indent=1) + "\n")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
