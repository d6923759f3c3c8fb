#!/usr/bin/env bash
# The install users get, on this machine: the wheel (built from a clean copy of the tree) into
# fresh virtual environments with nothing else in them, then run from a folder that has nothing
# of the repository. A file missing from the wheel, or a dependency missing from an extra, fails.
#   [edge]:   predict, learn, watch with no options (the bundled release package)
#   [server]: a first start serves the bundled package to a device
#   bash .ci/wheel.sh [WHEEL]
set -euo pipefail
cd "$(dirname "$0")/.."
say() { echo ".ci/wheel.sh: $*" >&2; }

wheel="${1:-$(bash .ci/build_wheel.sh dist)}"
wheel="$(cd "$(dirname "$wheel")" && pwd)/$(basename "$wheel")"
say "$(basename "$wheel"): $(($(stat -c %s "$wheel") / 1024)) KiB"
work="$(mktemp -d)"
server_pid=""
cleanup() { [ -z "$server_pid" ] || kill -- "-$server_pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/away/home" "$work/away/cam"
python - "$work/away/cam" <<'EOF'
import sys
import numpy as np
from PIL import Image
from infantino.export.tiny_package import synthetic_face
for label in range(3):
    Image.fromarray(synthetic_face(label, np.random.default_rng(label))).resize((160, 160)).save(f"{sys.argv[1]}/f{label}.jpg")
EOF
fresh() {  # fresh NAME EXTRA: a venv with only the wheel and that extra's dependencies
  local t0=$SECONDS
  python -m venv "$work/$1"
  "$work/$1/bin/pip" install -q --disable-pip-version-check "$wheel[$2]" >"$work/$1.log" 2>&1 \
    || { say "pip install [$2] failed:"; tail -5 "$work/$1.log" >&2; exit 1; }
  say "[$2] installed in $((SECONDS - t0)) s ($(du -sm "$work/$1" | cut -f1) MB)"
}
away() { (cd "$work/away" && env -i HOME="$work/away/home" PATH="$work/$1/bin:/usr/bin:/bin" LANG=C.UTF-8 "${@:2}"); }

fresh edge edge
away edge infantino-edge predict cam/f0.jpg
away edge infantino-edge learn cam/f0.jpg --label happy >/dev/null
away edge infantino-edge watch cam --fast >/dev/null
away edge python -c "from infantino.edge_runtime import Device; d = Device(); assert d.package.folder.name == 'release_model', d.package.folder" \
  || { say "the installed device did not run the bundled release"; exit 1; }
say "[edge]: predict, learn and watch ran from $work/away with no options"

fresh server server
for s in infantino-edge infantino-server infantino-export infantino-demo; do away server "$s" --help >/dev/null; done
token="$(away server infantino-server device add cam-1 --data-dir "$work/away/srv" --mlflow-uri off)"
port="$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
(cd "$work/away" && exec setsid env -i HOME="$work/away/home" PATH="$work/server/bin:/usr/bin:/bin" LANG=C.UTF-8 \
   infantino-server run --data-dir "$work/away/srv" --port "$port" --workers 1 --mlflow-uri off >"$work/server.log" 2>&1) &
server_pid=$!
for _ in $(seq 1 120); do
  if away server infantino-edge sync --server "http://127.0.0.1:$port" --token "$token" --state-dir "$work/away/state" \
       --json >"$work/sync.json" 2>"$work/sync.err"; then break; fi
  sleep 0.5
done
python - "$work/sync.json" "$work/server.log" <<'EOF' || { say "the installed server did not serve the bundled release:"; tail -5 "$work/server.log" "$work/sync.err" >&2; exit 1; }
import json, sys
report = json.load(open(sys.argv[1]))
log = open(sys.argv[2]).read()
assert "promoted the default package" in log and "release_model" in log, log[-2000:]
print(f".ci/wheel.sh: [server]: first start served {report['package_version']}, a device synced it", file=sys.stderr)
EOF
