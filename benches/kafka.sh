#!/usr/bin/env bash
# Benchmark (not a test): N row changes (default 1,000,000) published to Kafka by
# `run --role capture` and applied from Kafka by two `run --role apply` instances
# (one owns the apply lease and writes, the other stands by), next to a
# single-process `run` (`--role all`, no Kafka) draining the same backlog, and a
# single process with `[kafka]` (the same outputs as the split: change events and
# profile changes on Kafka), in the same run, on the same machine. Prints events/s
# for each, the ratios of apply to both, the CPU of each part, and writes
# target/bench/kafka.json.
#
#   benches/kafka.sh              # N=1000000
#   N=100000 benches/kafka.sh     # quicker
#
# Needs the PostgreSQL server binaries; the broker comes from tools/kafka-test-broker.sh
# (tansu on 127.0.0.1:$KAFKA_PORT, installed into ~/.cache on first use).
set -Eeuo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

N=${N:-1000000}
BATCH=100
SRC_PORT=${SRC_PORT:-56542}
SINK_PORT=${SINK_PORT:-56543}
export KAFKA_PORT=${KAFKA_PORT:-19092} TANSU_SOURCE=${TANSU_SOURCE:-pypi}
cargo build --release --quiet
BIN=$root/target/release/tributary
mkdir -p target/bench
(exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null || bash "$root/tools/kafka-test-broker.sh" start >/dev/null
. "$root/benches/clusters.sh"
. "$root/benches/crm-orders.sh"
clusters_init kafka-bench
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  mkdir -p "$root/target/bench/kafka-logs" && cp "$TMP"/*.log "$root/target/bench/kafka-logs/" 2>/dev/null || true
  clusters_stop
}
trap cleanup EXIT
start() { # name port
  cluster_start "$1" "$2" "shared_buffers = 512MB" "max_wal_size = 8GB" "synchronous_commit = off"
}
q() { local port=$1 db=$2; shift 2; psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d "$db" -At "$@"; }
now() { date +%s.%N; }
start src "$SRC_PORT"
start sink "$SINK_PORT"
q "$SRC_PORT" postgres -c "$BENCH_SCHEMA"
q "$SINK_PORT" postgres -c "create database split" -c "create database single" -c "create database singlek"
prefix="bench$(date +%s)"
config() { # db tag [kafka [prefix]]
  cat <<CFG
[sink]
url = "postgres://postgres@127.0.0.1:$SINK_PORT/$1"
[[source]]
name = "crm"
url = "postgres://postgres@127.0.0.1:$SRC_PORT/postgres"
slot = "crm_$2"
publication = "crm_$2"
$(bench_tables)
CFG
  if [ -n "${3:-}" ]; then
    printf '[kafka]\nbrokers = "127.0.0.1:%s"\ntopic_prefix = "%s"\npartitions = 6\n' "$KAFKA_PORT" "${4:-$prefix}"
  fi
}
config split split kafka >"$TMP/split.toml"
config single single >"$TMP/single.toml"
config singlek singlek kafka "${prefix}k" >"$TMP/singlek.toml"
# First runs: slots, publications, (empty) snapshots, topics; then stop.
for c in "split.toml --role capture" "single.toml" "singlek.toml"; do
  set -- $c
  "$BIN" --config "$TMP/$1" run "${@:2}" >>"$TMP/setup.log" 2>&1 &
  p=$!
  for _ in $(seq 1 300); do
    [ "$(q "$SINK_PORT" "${1%.toml}" -c "select count(*) from tributary.checkpoints where snapshot_completed_at is not null" 2>/dev/null || echo 0)" = 1 ] && break
    sleep 0.1
  done
  kill -TERM "$p"; wait "$p" || true
done
# The backlog: N row changes, as in native-backlog.sh.
quarter=$((N / 4)); txns=$((quarter / BATCH)); rows=$((txns * BATCH * 4))
q "$SRC_PORT" postgres -c "
do \$\$ declare t int; begin
  for t in 0..$((txns - 1)) loop
    insert into contacts select g, 'user'||g||'@example.com', 'F'||g, 'L'||g, '+1'||g, g % 2 = 0
      from generate_series(t*$BATCH + 1, (t+1)*$BATCH) g; commit;
  end loop;
  for t in 0..$((txns - 1)) loop
    insert into orders select g, 1 + (g % $quarter), 'paid', g % 10000
      from generate_series(t*$BATCH + 1, (t+1)*$BATCH) g; commit;
  end loop;
  for t in 0..$((txns - 1)) loop
    update contacts set phone = phone||'x', version = version + 1, updated_at = now()
      where id between t*$BATCH + 1 and (t+1)*$BATCH; commit;
  end loop;
  for t in 0..$((txns - 1)) loop
    update orders set status = 'shipped', updated_at = now() where id between t*$BATCH + 1 and (t+1)*$BATCH; commit;
  end loop;
end \$\$"
end_lsn=$(q "$SRC_PORT" postgres -c "select pg_current_wal_insert_lsn()")
# The source's own autovacuum of the backlog's tables, now rather than during a phase.
q "$SRC_PORT" postgres -c "vacuum analyze" -c "checkpoint"
want=$((txns * BATCH))
shipped() { q "$SINK_PORT" "$1" -c "select coalesce(sum((traits->>'shipped_orders')::bigint), 0) from tributary.profiles" 2>/dev/null || echo 0; }
export RUST_LOG=${RUST_LOG:-info}

# 1. Capture: sources -> Kafka, until its slot has confirmed the backlog's end.
t0=$(now)
"$BIN" --config "$TMP/split.toml" run --role capture >"$TMP/capture.log" 2>&1 & pids+=($!)
until [ "$(q "$SRC_PORT" postgres -c "select coalesce(confirmed_flush_lsn >= '$end_lsn', false) from pg_replication_slots where slot_name = 'crm_split'")" = t ]; do sleep 0.1; done
capture_s=$(awk "BEGIN{print $(now) - $t0}")
echo "capture (publish to Kafka): $rows events in ${capture_s}s = $(awk "BEGIN{printf \"%d\", $rows / $capture_s}") events/s"

# After a phase: its database vacuumed and analysed, and a checkpoint, so that
# the next phase's store CPU and time do not include autovacuum of the tables
# this one filled (which, without this, ran during later phases and made the
# single process with [kafka], measured last, look almost twice as costly).
settle() { q "$SINK_PORT" "$1" -c "vacuum analyze"; q "$SINK_PORT" postgres -c "checkpoint"; }

broker_cpu() { local t=0 p; for p in $(pgrep -f "tansu broker.*:$KAFKA_PORT"); do t=$((t + $(proc_cpu "$p"))); done; echo "$t"; }

# 2. Apply: Kafka -> store, two instances: the lease's owner writes, the other stands by.
sink_cpu0=$(cluster_cpu sink); broker_cpu0=$(broker_cpu)
t0=$(now)
apply_pids=()
for i in 1 2; do "$BIN" --config "$TMP/split.toml" run --role apply >"$TMP/apply$i.log" 2>&1 & pids+=($!); apply_pids+=($!); done
until [ "$(shipped split)" = "$want" ]; do sleep 0.2; done
apply_s=$(awk "BEGIN{print $(now) - $t0}")
apply_cpu=$(($(proc_cpu "${apply_pids[0]}") + $(proc_cpu "${apply_pids[1]}")))
apply_sink_cpu=$(($(cluster_cpu sink) - sink_cpu0)); apply_broker_cpu=$(($(broker_cpu) - broker_cpu0))
echo "apply (lease owner + standby, from Kafka): $rows events in ${apply_s}s = $(awk "BEGIN{printf \"%d\", $rows / $apply_s}") events/s"
echo "  cpu: apply instances $(secs "$apply_cpu") s, store $(secs "$apply_sink_cpu") s, broker $(secs "$apply_broker_cpu") s"
for p in "${apply_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
settle split

# 3. Single process, no Kafka, the same backlog into another store.
sink_cpu0=$(cluster_cpu sink); src_cpu0=$(cluster_cpu src)
t0=$(now)
"$BIN" --config "$TMP/single.toml" run >"$TMP/single.log" 2>&1 & pids+=($!); single_pid=$!
until [ "$(shipped single)" = "$want" ]; do sleep 0.2; done
single_s=$(awk "BEGIN{print $(now) - $t0}")
single_cpu=$(proc_cpu "$single_pid")
single_sink_cpu=$(($(cluster_cpu sink) - sink_cpu0)); single_src_cpu=$(($(cluster_cpu src) - src_cpu0))
echo "single process (--role all): $rows events in ${single_s}s = $(awk "BEGIN{printf \"%d\", $rows / $single_s}") events/s"
echo "  cpu: daemon $(secs "$single_cpu") s, store $(secs "$single_sink_cpu") s, source $(secs "$single_src_cpu") s"
kill -TERM "$single_pid" 2>/dev/null || true
settle single

# 4. Single process with [kafka]: the same outputs as capture + apply (change
# events and profile changes on Kafka, the store), in one process.
sink_cpu0=$(cluster_cpu sink); broker_cpu0=$(broker_cpu)
t0=$(now)
"$BIN" --config "$TMP/singlek.toml" run >"$TMP/singlek.log" 2>&1 & pids+=($!); singlek_pid=$!
until [ "$(shipped singlek)" = "$want" ]; do sleep 0.2; done
singlek_s=$(awk "BEGIN{print $(now) - $t0}")
singlek_cpu=$(proc_cpu "$singlek_pid")
singlek_sink_cpu=$(($(cluster_cpu sink) - sink_cpu0)); singlek_broker_cpu=$(($(broker_cpu) - broker_cpu0))
echo "single process with [kafka] (publishes changes and profile changes): $rows events in ${singlek_s}s = $(awk "BEGIN{printf \"%d\", $rows / $singlek_s}") events/s"
echo "  cpu: daemon $(secs "$singlek_cpu") s, store $(secs "$singlek_sink_cpu") s, broker $(secs "$singlek_broker_cpu") s"
kill -TERM "$singlek_pid" 2>/dev/null || true

same=$(diff <(q "$SINK_PORT" split -c "select traits::text from tributary.profile_view order by traits->>'email'") \
            <(q "$SINK_PORT" single -c "select traits::text from tributary.profile_view order by traits->>'email'") >/dev/null && echo true || echo false)
ratio=$(awk "BEGIN{printf \"%.2f\", $single_s / $apply_s}")
ratio_k=$(awk "BEGIN{printf \"%.2f\", $singlek_s / $apply_s}")
echo "apply / single process: $ratio (against the single process with [kafka]: $ratio_k)"
echo "stores equal: $same"
cat >"$root/target/bench/kafka.json" <<JSON
{"rows": $rows, "capture_s": $capture_s, "apply_s": $apply_s, "single_s": $single_s,
 "capture_events_per_s": $(awk "BEGIN{printf \"%d\", $rows / $capture_s}"),
 "apply_events_per_s": $(awk "BEGIN{printf \"%d\", $rows / $apply_s}"),
 "single_events_per_s": $(awk "BEGIN{printf \"%d\", $rows / $single_s}"),
 "singlek_s": $singlek_s, "singlek_events_per_s": $(awk "BEGIN{printf \"%d\", $rows / $singlek_s}"),
 "apply_vs_single": $ratio, "apply_vs_single_with_kafka": $ratio_k, "stores_equal": $same,
 "cpu_s": {"apply_instances": $(secs "$apply_cpu"), "apply_store": $(secs "$apply_sink_cpu"), "apply_broker": $(secs "$apply_broker_cpu"),
   "single_daemon": $(secs "$single_cpu"), "single_store": $(secs "$single_sink_cpu"), "single_source": $(secs "$single_src_cpu"),
   "singlek_daemon": $(secs "$singlek_cpu"), "singlek_store": $(secs "$singlek_sink_cpu"), "singlek_broker": $(secs "$singlek_broker_cpu")}}
JSON
