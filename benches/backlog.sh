#!/usr/bin/env bash
# Benchmark: drain a backlog of N row changes (default 1,000,000) into the profile
# store, next to PostgreSQL's own logical replication draining the same backlog
# into a plain copy of the tables, in the same run, on the same machine.
#
#   benches/backlog.sh            # N=1000000
#   N=100000 benches/backlog.sh   # quicker
#   PROBE=1 benches/backlog.sh    # also where the time went: CPU per daemon thread
#                                 # and server process, the store's statements,
#                                 # tables and WAL (target/bench/backlog-probe.txt)
#
# Uses benches/native-backlog.sh (two throwaway clusters; native
# publication/subscription timed first, then `tributary run` on the same backlog,
# both until their slot confirms the source's WAL end). Prints rows/s for both,
# the server's decode rate and the ratio; writes the figures to
# target/bench/backlog.json.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
cargo build --release --quiet
mkdir -p target/bench
export N=${N:-1000000}
export TRIBUTARY=$root/target/release/tributary
export OUT_JSON=$root/target/bench/backlog.json
export PROBE_OUT=$root/target/bench/backlog-probe.txt
export RUST_LOG=${RUST_LOG:-info}
# pg_ctl refuses root; the script runs the servers as `postgres` and needs a
# directory that user can read for the config and log it writes.
cd /tmp
bash "$root/benches/native-backlog.sh"
