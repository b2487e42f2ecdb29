#!/usr/bin/env bash
# Benchmark: the initial snapshot of N contacts and N orders (default 1,000,000
# each) into an empty profile store, next to PostgreSQL's own initial table copy
# (a subscription with copy_data = true) of the same two tables, in the same run,
# on the same machine.
#
#   benches/snapshot.sh            # N=1000000: 2,000,000 rows
#   N=200000 benches/snapshot.sh   # quicker
#   TRIBUTARY=/path/to/tributary benches/snapshot.sh   # another build (no cargo build)
#
# Two throwaway clusters (benches/clusters.sh). The tables are filled first;
# then the native subscription is created and timed until every table is
# synchronised (pg_subscription_rel: state 'r'); then `tributary run` starts on
# an empty store and is timed until its checkpoint records the snapshot
# complete, as one session polling inside the store every 50 ms sees it. The
# store is checked once at the end (every row a contribution, every order
# counted). Prints rows/s for both and the ratio, the CPU each used and the
# daemon's peak RSS; writes target/bench/snapshot.json.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
if [ -z "${TRIBUTARY:-}" ]; then
  cargo build --release --quiet
  TRIBUTARY=$root/target/release/tributary
fi
mkdir -p target/bench
N=${N:-1000000}
SRC_PORT=${SRC_PORT:-56542}
SINK_PORT=${SINK_PORT:-56543}
OUT_JSON=$root/target/bench/snapshot.json
export RUST_LOG=${RUST_LOG:-info}
cd /tmp
. "$root/benches/clusters.sh"
. "$root/benches/crm-orders.sh"
clusters_init snapshot-bench
tpid=
cleanup() {
  [ -n "$tpid" ] && kill -TERM "$tpid" 2>/dev/null && wait "$tpid" 2>/dev/null || true
  clusters_stop
}
trap cleanup EXIT
q() { local port=$1; shift; psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres -At "$@"; }
now() { date +%s.%N; }
start() { cluster_start "$1" "$2" "shared_buffers = 512MB" "max_wal_size = 8GB"; }

start src "$SRC_PORT"
start sink "$SINK_PORT"
q "$SRC_PORT" -c "$BENCH_SCHEMA" -c "create publication bench for table contacts, orders"
t0=$(now)
q "$SRC_PORT" -c "insert into contacts select g, 'user'||g||'@example.com', 'F'||g, 'L'||g, '+1'||g, g % 2 = 0
    from generate_series(1, $N) g" \
  -c "insert into orders select g, 1 + (g % $N), case when g % 3 = 0 then 'shipped' else 'paid' end, g % 10000
    from generate_series(1, $N) g" \
  -c "vacuum analyze contacts, orders" -c "checkpoint"
t1=$(now)
rows=$((2 * N))
load_s=$(awk "BEGIN{print $t1 - $t0}")

# Native: the subscription copies both tables (two table-sync workers, the default).
q "$SINK_PORT" -c "$BENCH_SCHEMA"
t0=$(now)
src_cpu0=$(cluster_cpu src); sink_cpu0=$(cluster_cpu sink)
q "$SINK_PORT" -c "create subscription bench connection 'host=127.0.0.1 port=$SRC_PORT user=postgres dbname=postgres' publication bench with (copy_data = true)" 2>/dev/null
q "$SINK_PORT" -c "do \$\$ begin
  while (select count(*) from pg_subscription_rel where srsubstate <> 'r') > 0
     or (select count(*) from pg_subscription_rel) < 2 loop
    perform pg_sleep(0.05);
  end loop;
end \$\$"
t1=$(now)
native_s=$(awk "BEGIN{print $t1 - $t0}")
native_src_cpu=$(($(cluster_cpu src) - src_cpu0)); native_sink_cpu=$(($(cluster_cpu sink) - sink_cpu0))
got=$(q "$SINK_PORT" -c "select (select count(*) from contacts) + (select count(*) from orders)")
[ "$got" = "$rows" ] || { echo "native copy incomplete: $got of $rows rows" >&2; exit 1; }
q "$SINK_PORT" -c "alter subscription bench disable" -c "alter subscription bench set (slot_name = none)" \
  -c "drop subscription bench"
q "$SRC_PORT" -c "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name like 'bench%' or slot_name like 'pg_%'" >/dev/null || true

# Tributary: the initial snapshot into an empty store.
q "$SINK_PORT" -c "create database profiles"
bench_config "$SRC_PORT" "$SINK_PORT" >"$TMP/tributary.toml"
chown -R postgres "$TMP" 2>/dev/null || true
t0=$(now)
src_cpu0=$(cluster_cpu src); sink_cpu0=$(cluster_cpu sink)
"$TRIBUTARY" run --config "$TMP/tributary.toml" >"$TMP/tributary.log" 2>&1 &
tpid=$!
# Once the daemon has migrated the store (it logs the first table's read;
# a session that reads the store's tables earlier would hold up the
# migration), one session polls the checkpoint inside the server.
until grep -q "snapshot of table started" "$TMP/tributary.log"; do
  kill -0 "$tpid" 2>/dev/null || { echo "tributary exited; log tail:" >&2; tail -5 "$TMP/tributary.log" >&2; exit 1; }
  sleep 0.05
done
psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$SINK_PORT" -U postgres -d profiles -At -c "do \$\$
declare done boolean := false;
begin
  while not done loop
    perform pg_sleep(0.05);
    select exists (select 1 from tributary.checkpoints where source = 'crm' and snapshot_completed_at is not null) into done;
  end loop;
end \$\$" &
waiter=$!
finished=
status=0
wait -n -p finished "$waiter" "$tpid" || status=$?
t1=$(now)
[ "$finished" = "$waiter" ] && [ "$status" = 0 ] || { echo "tributary exited or the wait failed; log tail:" >&2; tail -5 "$TMP/tributary.log" >&2; exit 1; }
trib_s=$(awk "BEGIN{print $t1 - $t0}")
trib_cpu=$(proc_cpu "$tpid")
trib_src_cpu=$(($(cluster_cpu src) - src_cpu0)); trib_sink_cpu=$(($(cluster_cpu sink) - sink_cpu0))
rss=$(awk '/VmHWM/ {print $2}' /proc/$tpid/status 2>/dev/null || echo 0)
kill -TERM "$tpid"; wait "$tpid" || true
tpid=
got=$(psql -X -At -h 127.0.0.1 -p "$SINK_PORT" -U postgres -d profiles -c "select count(*) from tributary.contributions where not deleted")
[ "$got" = "$rows" ] || { echo "tributary snapshot incomplete: $got of $rows contributions" >&2; exit 1; }
got=$(psql -X -At -h 127.0.0.1 -p "$SINK_PORT" -U postgres -d profiles -c "select coalesce(sum((traits->>'order_count')::bigint), 0) from tributary.profiles")
[ "$got" = "$N" ] || { echo "tributary snapshot incomplete: $got of $N orders counted" >&2; exit 1; }

rate() { awk "BEGIN{printf \"%d\", $1 / $2}"; }
printf 'source    %9d rows %8.2f s  (contacts and orders written, %d each)\n' "$rows" "$load_s" "$N"
printf 'native    %9d rows %8.2f s %9d rows/s  (subscription with copy_data = true)\n' "$rows" "$native_s" "$(rate "$rows" "$native_s")"
printf 'tributary %9d rows %8.2f s %9d rows/s  (initial snapshot into an empty store; peak RSS %d MiB)\n' "$rows" "$trib_s" "$(rate "$rows" "$trib_s")" "$((rss / 1024))"
printf 'ratio     %s  (tributary rows/s / native rows/s)\n' "$(awk "BEGIN{printf \"%.3f\", $native_s / $trib_s}")"
printf 'cpu       native: sink %s s, source %s s; tributary: daemon %s s, store %s s, source %s s\n' \
  "$(secs "$native_sink_cpu")" "$(secs "$native_src_cpu")" "$(secs "$trib_cpu")" "$(secs "$trib_sink_cpu")" "$(secs "$trib_src_cpu")"
cat >"$OUT_JSON" <<EOF
{"rows": $rows, "native_s": $native_s, "native_rows_per_s": $(rate "$rows" "$native_s"),
 "tributary_s": $trib_s, "tributary_rows_per_s": $(rate "$rows" "$trib_s"), "tributary_peak_rss_kib": $rss,
 "cpu_s": {"native_sink": $(secs "$native_sink_cpu"), "native_source": $(secs "$native_src_cpu"),
   "daemon": $(secs "$trib_cpu"), "store": $(secs "$trib_sink_cpu"), "source": $(secs "$trib_src_cpu")}}
EOF
