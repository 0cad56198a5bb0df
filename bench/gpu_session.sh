#!/usr/bin/env bash
# Spend a GPU window in one command: install, GPU tests, headline benchmarks vs peers, tuning sweep,
# all within --budget seconds, writing at most 8 files (each < 16 MB) to --out. See docs/GPU.md.
#
#   bash bench/gpu_session.sh [--out DIR] [--wheels DIR] [--budget SECONDS] [--dry-run]
#
#   --out DIR         results folder (default bench/results/<gpu-name>/; dry run: bench/results/_scratch/dry-run/)
#   --wheels DIR      wheels installed with --no-deps --no-index (default .gpu-wheels/ in the checkout)
#   --budget SECONDS  the whole run ends within this (default 480), whatever happens
#   --dry-run         the same phases on CPU: tiny shapes, Triton interpreted; the install goes into a
#                     throwaway venv and folder (CI runs this)
#
# Environment: PYTHON (default python3), ALIGNKERNELS_COMMIT (the commit measured, for a checkout
# copied without .git), GPU_SESSION_LIMITS="install build tests bench" (per-phase seconds),
# GPU_SESSION_INSTALL_PYTHON (dry run: the interpreter the install is rehearsed with; default a
# fresh venv made by `$PYTHON -m venv`).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="" WHEELS=".gpu-wheels" BUDGET=480 DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n 2,15p "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
SUMMARY_RESERVE=25   # seconds kept for the summary, whatever the phases do
# Limits from the rehearsal (docs/GPU.md "Phases and budgets"): they add up to 445 s of the 455 s a
# 480 s budget leaves; what a phase does not use goes to the tuning sweep at the end.
read -r LIM_INSTALL LIM_BUILD LIM_TESTS LIM_BENCH <<<"${GPU_SESSION_LIMITS:-40 60 130 180}"
LIM_PROBE=15 LIM_ENV=20
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-session.XXXXXX")"
LOG="$WORK/phases.log"
: >"$WORK/status.tsv"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
DRYFLAG=()
if [ "$DRY" = 1 ]; then
  DRYFLAG=(--dry-run)
  # the rehearsal makes a venv first and may install wheels one by one (a py312 wheel on another
  # Python): more time than the GPU machine's install needs
  [ -z "${GPU_SESSION_LIMITS:-}" ] && LIM_INSTALL=120
  # the Triton providers run on CPU tensors in the interpreter (read when kernels are decorated)
  export TRITON_INTERPRET=1 ALIGNKERNELS_BENCH_TRITON_ON_CPU=1 CUDA_VISIBLE_DEVICES=""
fi

say() { echo "[gpu_session +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# phase NAME LIMIT CMD...: run CMD under `timeout`, capped so the summary keeps its reserve.
phase() {
  local name="$1" limit="$2"; shift 2
  local left=$((DEADLINE - SUMMARY_RESERVE - $(date +%s)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    say "phase $name: skipped (${left}s left)"
    printf '%s\tskip\t0\t0\tbudget spent\n' "$name" >>"$WORK/status.tsv"
    return
  fi
  say "phase $name: limit ${limit}s"
  local t0; t0=$(date +%s)
  timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\t\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >>"$WORK/status.tsv"
  say "phase $name: exit $rc after $(( $(date +%s) - t0 ))s"
}
deadline_for() { echo $(( $(date +%s) + $1 - 3 )); }   # a phase's own deadline, a little inside its limit
SESSION=("$PY" -m bench.gpu_session)   # + PHASE --work DIR [--dry-run] --deadline EPOCH

# Wheels go to their own folder on PYTHONPATH (the machine's site-packages may be read-only).
SITE="${GPU_SESSION_SITE:-${TMPDIR:-/tmp}/gpu-session-site}"
IPY="$PY"   # the interpreter the project is installed for
MAKE_VENV=""  # dry run: a throwaway venv to install into, made by the install phase
# Wheels --no-deps --no-index into $SITE: all in one pip call, and one by one if that fails (a
# wheel this Python refuses then costs only that wheel).
install_wheels() {
  [ $# -eq 0 ] && return 0
  if "$IPY" -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "$@"; then
    echo "installed into $SITE: $(for w in "$@"; do basename "$w"; done | tr '\n' ' ')"; return 0
  fi
  local failed=0 whl
  for whl in "$@"; do
    if "$IPY" -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "$whl"; then
      echo "installed $(basename "$whl") into $SITE"
    else
      echo "FAILED to install $(basename "$whl")"; failed=1
    fi
  done
  return $failed
}
install() {
  local failed=0 whl tools=() peers=()
  if [ -n "$MAKE_VENV" ]; then
    "$PY" -m venv "$MAKE_VENV" && IPY="$MAKE_VENV/bin/python" || return 3
  fi
  if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    for whl in "$WHEELS"/*.whl; do
      case "$(basename "$whl")" in
        setuptools-*|wheel-*|pytest_timeout-*) tools+=("$whl") ;;
        *) peers+=("$whl") ;;
      esac
    done
  else
    echo "no wheels in $WHEELS: peers not installed there are skipped with a note"
  fi
  # Build and test tools first: Ubuntu's Python 3.12 ships setuptools 68 and no `wheel`, with which
  # an editable install fails ("invalid command 'bdist_wheel'"); $SITE is on PYTHONPATH, so the
  # build backend below imports these.
  install_wheels "${tools[@]}" || failed=1
  install_wheels "${peers[@]}" || failed=1
  # The project, without touching the machine's torch (no deps, no build isolation, no index);
  # where site-packages is read-only, into the user site instead. An editable install's import hook
  # maps kernels/ to alignkernels.kernels; without any install, alignkernels/__init__.py maps the
  # checkout's kernels/ itself (the last resort: the phases run from the checkout's root).
  "$IPY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || "$IPY" -m pip install -q --no-deps --no-build-isolation --no-index --user -e . \
    || { echo "project install FAILED: the phases import alignkernels from the checkout"; return 3; }
  # the install must map alignkernels.kernels outside the checkout too (find_spec imports no torch)
  (cd / && "$IPY" -c 'import importlib.util as u, sys; s = u.find_spec("alignkernels.kernels")
print("alignkernels.kernels ->", s and s.origin); sys.exit(0 if s else 1)') || return 3
  return $failed
}

say "start: budget ${BUDGET}s, work $WORK, dry run $DRY"
if [ "$DRY" = 1 ]; then
  # The install rehearsed offline into throwaway places: a folder for the wheels and a venv
  # (GPU_SESSION_INSTALL_PYTHON, e.g. one holding an old setuptools and no wheel, or a fresh one).
  SITE="$WORK/site"
  IPY="${GPU_SESSION_INSTALL_PYTHON:-}"
  [ -z "$IPY" ] && MAKE_VENV="$WORK/venv"
fi
mkdir -p "$SITE"
export -f install install_wheels; export PY IPY WHEELS SITE MAKE_VENV
if [ "$DRY" = 1 ]; then
  phase install "$LIM_INSTALL" env PYTHONPATH="$SITE" bash -c install
else
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  phase install "$LIM_INSTALL" bash -c install
fi
# The checkout last on the path: whatever the install did, alignkernels imports from it.
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

# The device's capability (e.g. "90"), under a limit: a CUDA initialisation that hangs costs 15 s,
# and then no phase touches the device (each would hang until its own limit).
phase probe "$LIM_PROBE" "$PY" -c 'import sys, torch
ok = torch.cuda.is_available()
open(sys.argv[1], "w").write("%d%d" % torch.cuda.get_device_capability() if ok else "none")
print("CUDA device:", torch.cuda.get_device_name(0) if ok else "none")' "$WORK/arch"
ARCH=$(cat "$WORK/arch" 2>/dev/null)
if [ -z "$ARCH" ] && ! grep -q "^probe	skip" "$WORK/status.tsv"; then   # ran, and did not finish
  NO_DEVICE="the device probe did not finish (CUDA initialisation hung or failed): see phases.log"
fi
# the CUDA extension for this GPU only: one arch builds in a fraction of the time
if [ -n "$ARCH" ] && [ "$ARCH" != none ]; then export ALIGNKERNELS_CUDA_ARCHS="$ARCH"; fi
phase env "$LIM_ENV" "${SESSION[@]}" env --work "$WORK" "${DRYFLAG[@]}" --deadline "$(deadline_for "$LIM_ENV")"
if [ -n "${NO_DEVICE:-}" ]; then
  for p in build tests bench tune; do
    say "phase $p: skipped ($NO_DEVICE)"
    printf '%s\tskip\t0\t0\t%s\n' "$p" "$NO_DEVICE" >>"$WORK/status.tsv"
  done
else
  phase build "$LIM_BUILD" "${SESSION[@]}" build --work "$WORK" "${DRYFLAG[@]}" --deadline "$(deadline_for "$LIM_BUILD")"
  phase tests "$LIM_TESTS" "${SESSION[@]}" tests --work "$WORK" "${DRYFLAG[@]}" --deadline "$(deadline_for "$LIM_TESTS")"
  phase bench "$LIM_BENCH" "${SESSION[@]}" bench --work "$WORK" "${DRYFLAG[@]}" --deadline "$(deadline_for "$LIM_BENCH")"
  LEFT=$((DEADLINE - SUMMARY_RESERVE - $(date +%s)))
  phase tune "$LEFT" "${SESSION[@]}" tune --work "$WORK" "${DRYFLAG[@]}" --deadline "$(deadline_for "$LEFT")"
fi

# The summary always runs, inside the reserve; if even it fails, the raw logs are copied.
OUTARGS=(); [ -n "$OUT" ] && OUTARGS=(--out "$OUT")
LEFT=$((DEADLINE - $(date +%s) - 2)); [ "$LEFT" -lt 5 ] && LEFT=5
say "summary: limit ${LEFT}s"
if ! timeout -k 2 "$LEFT" "$PY" -m bench.gpu_session summary --work "$WORK" "${DRYFLAG[@]}" "${OUTARGS[@]}" 2>&1 | tee -a "$LOG"; then
  FALLBACK="${OUT:-bench/results/_scratch/failed-summary}"
  mkdir -p "$FALLBACK"
  cp "$WORK/phases.log" "$WORK/status.tsv" "$FALLBACK/" 2>/dev/null
  echo "summary failed: raw logs copied to $FALLBACK" >&2
  exit 1
fi
say "done in $(( $(date +%s) - START ))s"
rm -rf "$WORK"
