#!/usr/bin/env bash
# Benchmark: drain a backlog of N row changes (default 1,000,000) into the profile
# store, next to PostgreSQL's own logical replication draining the same backlog
# into a plain copy of the tables, in the same run, on the same machine.
#
#   benches/backlog.sh            # N=1000000
#   N=100000 benches/backlog.sh   # quicker
#
# Uses ../shared/bench/native-backlog.sh (two throwaway clusters; native
# publication/subscription timed first, then `tributary run` on the same backlog).
# Prints rows/s for both and the ratio; writes the figures to target/bench/backlog.json.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
shared=${SHARED:-$root/../shared}
[ -x "$shared/bench/native-backlog.sh" ] || [ -f "$shared/bench/native-backlog.sh" ] || {
  echo "need ../shared/bench/native-backlog.sh (set SHARED=/path/to/shared)" >&2; exit 2; }
cargo build --release --quiet
mkdir -p target/bench
export N=${N:-1000000}
export TRIBUTARY=$root/target/release/tributary
export OUT_JSON=$root/target/bench/backlog.json
export RUST_LOG=${RUST_LOG:-info}
# pg_ctl refuses root; the script runs the servers as `postgres` and needs a
# directory that user can read for the config and log it writes.
cd /tmp
bash "$shared/bench/native-backlog.sh"
