#!/usr/bin/env bash
# The embedded default: all four services on this machine, a few requests, a clean stop.
set -euo pipefail
cd "$(dirname "$0")/.."

log_dir=$(mktemp -d)
mirador up --log-dir "$log_dir" > "$log_dir/up.out" 2>&1 &
up_pid=$!
trap 'kill -TERM $up_pid 2>/dev/null || true; wait $up_pid 2>/dev/null || true; cat "$log_dir/up.out" | tail -2' EXIT

for _ in $(seq 100); do
  grep -q "^Ctrl-C" "$log_dir/up.out" 2>/dev/null && break
  if ! kill -0 $up_pid 2>/dev/null; then cat "$log_dir/up.out"; exit 1; fi
  sleep 0.2
done
cat "$log_dir/up.out"

step() { printf '\n$ %s\n' "$*"; "$@" || echo "(exit $?)"; }
step mirador status
step mirador route "Is a prior authorization required for an MRI of the lumbar spine?"
step mirador route "Extract the member id from: MEMBER ID QA0000TEST GROUP 00-FAKE-77"
step mirador ask "What is the capital of France?"
step mirador ask "Write a Python function that adds two numbers." --max-tokens 64
# the consensus routes: three models vote; compliance escalates to the review queue
step mirador ask "Is it a HIPAA violation to leave a voicemail that mentions a member's diagnosis?"
step mirador ask --route topics "Manchester United beat Arsenal 3-1 on Saturday, with two goals from Rooney."
step mirador review list --limit 3
step mirador status
