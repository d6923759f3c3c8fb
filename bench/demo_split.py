"""Write the demo's split of the infant photos as two ImageFolder trees of symlinks (outside the repo).

    python bench/demo_split.py /tmp/demo-split        # -> /tmp/demo-split/{stream,test}/<class>/

``stream`` holds the photos the demo's cameras see (the release's infant training set),
``test`` the 25 % it holds out (seed 0, duplicates kept on one side: ``infantino.fleet_demo.data.plan_split``).
A package trained on ``stream`` passes the demo's leak check; one trained on ``test`` is refused.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from infantino.edge_runtime.core.preprocess import CLASSES
from infantino.fleet_demo.data import find_images, plan_split


def link_split(out: Path, images: str | None = None, devices: int = 4, seed: int = 0) -> dict[str, int]:
    shards, test = plan_split(find_images(images), devices, seed)
    parts = {"stream": [it for shard in shards for it in shard], "test": test}
    for name, items in parts.items():
        for path, label in items:
            d = out / name / CLASSES[label]
            d.mkdir(parents=True, exist_ok=True)
            link = d / Path(path).name
            if not link.exists():
                os.symlink(Path(path).resolve(), link)
    return {k: len(v) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--images", help="infant ImageFolder (default: the demo's)")
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(link_split(args.out, args.images, args.devices, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
