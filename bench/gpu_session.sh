#!/usr/bin/env bash
# Spend a GPU window in one command: install, GPU tests, headline benchmarks vs peers, tuning sweep,
# all within --budget seconds, writing at most 8 files (each < 16 MB) to --out. See docs/GPU.md.
#
#   bash bench/gpu_session.sh [--out DIR] [--wheels DIR] [--budget SECONDS] [--dry-run]
#
#   --out DIR         results folder (default bench/results/<gpu-name>/; dry run: bench/results/_scratch/dry-run/)
#   --wheels DIR      wheels installed with --no-deps --no-index (default .gpu-wheels/ in the checkout)
#   --budget SECONDS  the whole run ends within this (default 480), whatever happens
#   --dry-run         the same phases on CPU: tiny shapes, Triton interpreted, no installs (CI runs this)
#
# Environment: PYTHON (default python3), ALIGNKERNELS_COMMIT (the commit measured, for a checkout
# copied without .git), GPU_SESSION_LIMITS="install build tests bench" (per-phase seconds).
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
read -r LIM_INSTALL LIM_BUILD LIM_TESTS LIM_BENCH <<<"${GPU_SESSION_LIMITS:-60 120 150 210}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-session.XXXXXX")"
LOG="$WORK/phases.log"
: >"$WORK/status.tsv"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
DRYFLAG=()
if [ "$DRY" = 1 ]; then
  DRYFLAG=(--dry-run)
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

# Peers go to their own folder on PYTHONPATH (the machine's site-packages may be read-only).
SITE="${GPU_SESSION_SITE:-${TMPDIR:-/tmp}/gpu-session-site}"
install() {
  local failed=0 whl
  if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    for whl in "$WHEELS"/*.whl; do   # one by one: a wheel this Python refuses costs only that peer
      if "$PY" -m pip install -q --no-deps --no-index --no-compile --upgrade --target "$SITE" "$whl"; then
        echo "installed $(basename "$whl") into $SITE"
      else
        echo "FAILED to install $(basename "$whl")"; failed=1
      fi
    done
  else
    echo "no wheels in $WHEELS: peers not installed there are skipped with a note"
  fi
  # the project, without touching the machine's torch (no deps, no build isolation, no index);
  # where site-packages is read-only, into the user site instead (an editable install's import
  # hook is what maps kernels/ to alignkernels.kernels, so it must be an editable install)
  "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    || "$PY" -m pip install -q --no-deps --no-build-isolation --no-index --user -e . \
    || return 3
  return $failed
}

say "start: budget ${BUDGET}s, work $WORK, dry run $DRY"
if [ "$DRY" = 1 ]; then
  say "phase install: skipped in a dry run (would run: pip install --no-deps --no-index $WHEELS/*.whl; pip install --no-deps --no-build-isolation --no-index -e .)"
  printf 'install\tskip\t0\t0\tdry run\n' >>"$WORK/status.tsv"
else
  mkdir -p "$SITE"; export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export -f install; export PY WHEELS SITE
  phase install "$LIM_INSTALL" bash -c install
  # the CUDA extension for this GPU only (e.g. "90"): one arch builds in a fraction of the time
  ARCH=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}{n}")' 2>>"$LOG")
  [ -n "$ARCH" ] && export ALIGNKERNELS_CUDA_ARCHS="$ARCH"
fi
phase env 30 "${SESSION[@]}" env --work "$WORK" "${DRYFLAG[@]}" --deadline "$(deadline_for 30)"
phase build "$LIM_BUILD" "${SESSION[@]}" build --work "$WORK" "${DRYFLAG[@]}" --deadline "$(deadline_for "$LIM_BUILD")"
phase tests "$LIM_TESTS" "${SESSION[@]}" tests --work "$WORK" "${DRYFLAG[@]}" --deadline "$(deadline_for "$LIM_TESTS")"
phase bench "$LIM_BENCH" "${SESSION[@]}" bench --work "$WORK" "${DRYFLAG[@]}" --deadline "$(deadline_for "$LIM_BENCH")"
LEFT=$((DEADLINE - SUMMARY_RESERVE - $(date +%s)))
phase tune "$LEFT" "${SESSION[@]}" tune --work "$WORK" "${DRYFLAG[@]}" --deadline "$(deadline_for "$LEFT")"

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
