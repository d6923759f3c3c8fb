#!/usr/bin/env bash
# Build the wheel as a clean checkout builds it: from a copy of the files a commit of this tree
# holds (tracked, plus untracked that git does not ignore), so build leftovers never hide a
# missing file. Prints the wheel's path.   bash .ci/build_wheel.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mkdir -p "$1" && cd "$1" && pwd)"
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} sh -c 'test -f "{}" && printf "%s\0" "{}"' \
  | tar --null -T - -cf - | tar -xf - -C "$src"
rm -f "$out"/infantino_edge-*.whl
python -m pip wheel "$src" --no-deps --no-build-isolation --disable-pip-version-check -q -w "$out" >&2
ls "$out"/infantino_edge-*.whl
