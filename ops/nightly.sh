#!/usr/bin/env bash
# The nightly sequence (README "Nightly runs"): append the day's dump, score what changed,
# curate what is new. Each step is one job with one JSON summary line on stdout; the first
# step that does not exit 0 stops the night with its exit code (2: fix the command or the
# config; 3: the job refused the data, read its one-line error; 1: a crash, read the log).
#
#   ops/nightly.sh DUMP.bson [KIND]      KIND: test (default) or train
#
# Folders, the run and the table come from the config (HIERARCHY_CONFIG, default the
# embedded conf/local.yaml: paths.data, paths.models, paths.output) and these variables:
#   HIERARCHY_RUN_ID   the run to score with (required)
#   HIERARCHY_BIN      the hierarchy command (default: hierarchy on PATH)
#   HIERARCHY_LOG      where the JSON lines go (default: stdout only)
set -uo pipefail

dump="${1:?usage: ops/nightly.sh DUMP.bson [test|train]}"
kind="${2:-test}"
run_id="${HIERARCHY_RUN_ID:?set HIERARCHY_RUN_ID to the run that scores the catalog}"
bin="${HIERARCHY_BIN:-hierarchy}"
categories="${HIERARCHY_CATEGORIES:-$(dirname "$dump")/category_names.csv}"
config=()
[ -n "${HIERARCHY_CONFIG:-}" ] && config=(--config "$HIERARCHY_CONFIG")
log="${HIERARCHY_LOG:-/dev/null}"

step() {
  "$bin" "$@" "${config[@]}" -q | tee -a "$log"
  local code=${PIPESTATUS[0]}
  if [ "$code" -ne 0 ]; then
    echo "nightly: '$1' exited $code; the night stops here" >&2
    exit "$code"
  fi
}

step ingest --append --kind "$kind" --input "$dump" --categories "$categories"
if [ "$kind" = test ]; then
  step predict --run-id "$run_id" --split test
fi
step curate
