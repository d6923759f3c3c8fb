#!/usr/bin/env bash
# The device install on aarch64 (a Raspberry Pi's Debian): a Debian bookworm arm64 root built
# with debootstrap (or reused), run under QEMU user emulation; the wheel installed there with
# [edge] from PyPI (arm64 wheels only, nothing compiled), then predict, learn and watch on a
# few photos, and the probabilities compared with this machine's (x86) on the same photos.
#
#   bash .ci/aarch64.sh [WHEEL]        WHEEL default: built into dist/ (.ci/build_wheel.sh)
#   bash .ci/aarch64.sh --check        exit 0 when this machine can run it, else say why and exit 1
#
# Needs root and the Debian packages debootstrap + qemu-user-static (+ binfmt-support). Three
# traps, handled below: binfmt_misc must be mounted and qemu-aarch64 enabled; onnxruntime
# segfaults on import under QEMU 7.2 unless the guest sees an ARM /proc/cpuinfo (an emulation
# artefact: a Pi-style file is bind-mounted over it); pip in the root needs this machine's CA
# certificates. Tolerance: the face-crop step differs between the two CPUs (the same boxes, but
# OpenCV's warp rounds differently: a few crop pixels, amplified on photos whose top two classes
# are close; measured 3.8e-2 in probability on 14 real photos with the issue-12 release, 5.9e-2
# with issue 22's, whose infant-fitted head is sharper; all labels equal both times), so 1e-1
# there, a guard against a broken path, not a parity claim; the parity claim is the other path:
# with --no-face-detect (the same pixels in, ONNX Runtime on each CPU) they agree to 1e-4 (measured: 0).
set -euo pipefail
cd "$(dirname "$0")/.."

ROOT="${INFANTINO_ARM64_ROOT:-/var/cache/infantino/arm64-bookworm}"
MIRROR="${INFANTINO_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
TOL_FACE="${INFANTINO_ARM64_TOL:-0.1}"    # with the face crop: the same boxes, but the eye-levelling warp rounds differently (5.9e-2 measured)
TOL_CENTRE=1e-4                            # --no-face-detect: the same pixels in, int8 ONNX Runtime on each CPU
PHOTOS_PER_CLASS=2
say() { echo ".ci/aarch64.sh: $*" >&2; }

can_run() {
  [ "$(id -u)" = 0 ] || { echo "needs root (debootstrap, chroot, mounts)"; return 1; }
  [ "$(uname -m)" = x86_64 ] || { echo "runs on an x86_64 host (it compares aarch64 with it)"; return 1; }
  command -v debootstrap >/dev/null || { echo "no debootstrap: apt-get install debootstrap qemu-user-static binfmt-support"; return 1; }
  [ -x /usr/bin/qemu-aarch64-static ] || { echo "no qemu-aarch64-static: apt-get install qemu-user-static binfmt-support"; return 1; }
  if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null \
      || { echo "binfmt_misc cannot be mounted here (a container without the privilege)"; return 1; }
  fi
  return 0
}

if [ "${1:-}" = --check ]; then
  why="$(can_run)" && exit 0
  say "cannot run here: $why"; exit 1
fi
why="$(can_run)" || { say "cannot run here: $why"; exit 1; }
start=$SECONDS

# Trap 1: binfmt_misc is mounted (can_run); the interpreter must be registered and enabled.
update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { say "qemu-aarch64 is not registered with binfmt_misc (update-binfmts --enable qemu-aarch64 failed)"; exit 1; }

# The root: built once (5 min here, the second stage under emulation), then reused.
if [ ! -f "$ROOT/.infantino-ready" ]; then
  say "building the bookworm arm64 root in $ROOT"
  rm -rf "$ROOT.tmp"; mkdir -p "$(dirname "$ROOT")"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOT.tmp" "$MIRROR" >/tmp/infantino-debootstrap.log 2>&1 \
    || { say "debootstrap failed, see /tmp/infantino-debootstrap.log"; tail -5 /tmp/infantino-debootstrap.log >&2; exit 1; }
  rm -rf "$ROOT"; mv "$ROOT.tmp" "$ROOT"; touch "$ROOT/.infantino-ready"
fi
built=$SECONDS

# Trap 3: this machine's CA certificates (and resolver) inside the root, for pip.
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$ROOT/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
fi

# Trap 2: an ARM /proc/cpuinfo over the emulated one (a Raspberry Pi 4's), mounted for this run only.
{
  for cpu in 0 1; do  # two Cortex-A72 cores, as a Pi 4 lists them
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n' "$cpu"
    printf 'CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n'
  done
  printf 'Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n'
} >"$ROOT/etc/infantino-cpuinfo"
mounted=()
cleanup() { for ((i=${#mounted[@]}-1; i>=0; i--)); do umount -l "${mounted[$i]}" 2>/dev/null || true; done; }
trap cleanup EXIT
mount -t proc proc "$ROOT/proc"; mounted+=("$ROOT/proc")
mount --bind "$ROOT/etc/infantino-cpuinfo" "$ROOT/proc/cpuinfo"; mounted+=("$ROOT/proc/cpuinfo")
mount --bind /dev "$ROOT/dev"; mounted+=("$ROOT/dev")
mount -t sysfs -o ro sysfs "$ROOT/sys"; mounted+=("$ROOT/sys")  # ONNX Runtime's cpuinfo reads the processor lists there
# PIP_CERT: pip's own certifi bundle lacks this machine's CA; the root's system bundle has it after update-ca-certificates
in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/work/home PATH=/opt/infantino/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
  PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_CACHE_DIR=/var/cache/pip QEMU_CPU=cortex-a72 "$@"; }
# PIP_CACHE_DIR: the cache stays in the root, a rerun downloads nothing. QEMU_CPU: a Raspberry Pi
# 4's core; QEMU's default "max" CPU offers dot-product and i8mm instructions a Pi 4 lacks, and
# ONNX Runtime then picks other int8 kernels (3.1e-2 apart from x86 even without the face crop).
in_root update-ca-certificates >/dev/null 2>&1 || { say "update-ca-certificates failed in the root"; exit 1; }
[ "$(in_root uname -m)" = aarch64 ] || { say "the root does not run as aarch64"; exit 1; }

# The wheel: given, or built from this checkout.
wheel="${1:-}"
[ -n "$wheel" ] || wheel="$(bash .ci/build_wheel.sh dist)"
rm -rf "$ROOT/work" && mkdir -p "$ROOT/work/home" "$ROOT/work/photos"
cp "$wheel" "$ROOT/work/"
whl="/work/$(basename "$wheel")"

# Photos: a few real ones when the data is here (copied into the throw-away root, never the
# repository), else synthetic faces.
data="${INFANTINO_DATA:-$(cd .. && pwd)/shared/data}"
python - "$data/infant" "$ROOT/work/photos" "$PHOTOS_PER_CLASS" <<'EOF'
import shutil, sys
from pathlib import Path
src, dest, per = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
if src.is_dir():
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        for photo in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:per]:
            shutil.copyfile(photo, dest / f"{folder.name}-{photo.name}")
else:
    import numpy as np
    from PIL import Image
    from infantino.export.tiny_package import synthetic_face
    for label in range(7):
        for k in range(per):
            Image.fromarray(synthetic_face(label, np.random.default_rng(k))).resize((192, 192)).save(dest / f"s{label}-{k}.png")
EOF
first="$(ls "$ROOT/work/photos" | head -n 1)"

# Install as a Pi does: a venv, the wheel with [edge] from PyPI, wheels only (nothing compiled).
# The venv is kept between runs (the dependencies take ~5 minutes to unpack under emulation);
# the wheel itself is always reinstalled. INFANTINO_ARM64_FRESH=1 starts from an empty venv.
t0=$SECONDS
if [ "${INFANTINO_ARM64_FRESH:-0}" = 1 ] || [ ! -x "$ROOT/opt/infantino/bin/python" ]; then
  in_root rm -rf /opt/infantino
  in_root python3 -m venv /opt/infantino
fi
{ in_root pip install -q --disable-pip-version-check --only-binary=:all: "$whl[edge]" \
  && in_root pip install -q --disable-pip-version-check --force-reinstall --no-deps "$whl"; } >/tmp/infantino-arm64-pip.log 2>&1 \
  || { say "pip install in the arm64 root failed:"; tail -5 /tmp/infantino-arm64-pip.log >&2; exit 1; }
t_install=$((SECONDS - t0))
venv_mb="$(du -sm "$ROOT/opt/infantino" | cut -f1)"

# The three device jobs, from a folder with no options (the bundled release package).
t0=$SECONDS
in_root sh -c "cd /work && infantino-edge predict photos/* --json" >"$ROOT/work/arm-face.json"
t_predict=$((SECONDS - t0))
in_root sh -c "cd /work && infantino-edge predict photos/* --json --no-face-detect" >"$ROOT/work/arm-centre.json"
t0=$SECONDS
in_root sh -c "cd /work && infantino-edge learn 'photos/$first' --label happy" >/dev/null
t_learn=$((SECONDS - t0))
t0=$SECONDS
in_root sh -c "cd /work && infantino-edge watch photos --fast" >/dev/null
t_watch=$((SECONDS - t0))

# The same photos on this machine, through the same release files (a fresh state: the
# package's own head, as on the arm64 side before it learned).
x86="$(mktemp -d)"
python -m zipfile -e "$wheel" "$x86/wheel"  # the very files the arm64 side opened
bundled="$x86/wheel/infantino/edge_runtime/release_model"
for mode in face centre; do
  flag=""; [ "$mode" = centre ] && flag="--no-face-detect"
  (cd "$ROOT/work" && HOME="$x86" python -m infantino.edge_runtime.cli predict photos/* --json $flag \
     --model-dir "$bundled" --state-dir "$x86/state-$mode") >"$x86/x86-$mode.json"
done

python - "$ROOT/work" "$x86" "$TOL_FACE" "$TOL_CENTRE" <<EOF
import json, sys
arm, x86, tol_face, tol_centre = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
bad = []
for mode, tol in (("face", tol_face), ("centre", tol_centre)):
    a = json.load(open(f"{arm}/arm-{mode}.json")); b = json.load(open(f"{x86}/x86-{mode}.json"))
    assert [r["image"] for r in a] == [r["image"] for r in b], "the two runs saw different photos"
    diff = max(abs(r["probabilities"][c] - s["probabilities"][c]) for r, s in zip(a, b) for c in r["probabilities"])
    same = sum(r["label"] == s["label"] for r, s in zip(a, b))
    faces = sum(r["face_found"] for r in a)
    print(f"aarch64 vs x86, {mode:6s}: {len(a)} photos, {faces} faces found on arm64, labels equal {same}/{len(a)}, "
          f"max |dp| {diff:.2e} (tolerance {tol:g})")
    if diff > tol:
        bad.append(f"{mode}: max |dp| {diff:.2e} > {tol:g}")
sys.exit("aarch64 differs from x86: " + "; ".join(bad) if bad else 0)
EOF
echo "aarch64 timings: root $((built - start)) s (0 when reused), pip install [edge] ${t_install} s (venv ${venv_mb} MB)," \
     "predict $(ls "$ROOT/work/photos" | wc -l) photos ${t_predict} s, learn ${t_learn} s, watch ${t_watch} s, total $((SECONDS - start)) s"
rm -rf "$x86"
