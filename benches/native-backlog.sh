#!/usr/bin/env bash
# native-backlog.sh: "drain a backlog of N row changes into a sink", by
# PostgreSQL's own logical replication (publication + subscription) and, with
# TRIBUTARY set, by Tributary into a profile store, on the same backlog in the
# same run. benches/backlog.sh calls it; it needs only the PostgreSQL server
# binaries and psql.
#
# Two throwaway clusters (source, sink). The subscription exists but is disabled while the
# workload writes N row changes (CRM contacts and shop orders, 100 rows per transaction:
# inserts, then updates); then it is enabled and the catch-up is timed until the slot's
# confirmed_flush_lsn reaches the source's WAL end. Also times the server-side pgoutput
# decode of the same backlog (pg_logical_slot_peek_binary_changes), the ceiling of any client.
#
# Tributary is timed by the same rule as native replication: until its slot's
# confirmed_flush_lsn reaches the source's WAL end (it confirms a position only
# after the store committed it), as one session polling inside the source server
# sees it. The profile store is then checked once (every
# shipped order counted). Polling the store itself while it drains (a scan of
# every profile five times a second) took a third of a core from the store in
# a 1M run, so it is done once, at the end.
#
# Usage: N=1000000 ./native-backlog.sh        prints rows/s lines and writes $OUT_JSON
#        TRIBUTARY=target/release/tributary N=1000000 ./native-backlog.sh
#        PROBE=1 TRIBUTARY=... ./native-backlog.sh  also writes $PROBE_OUT: where the
#          store's and the daemon's time went during Tributary's drain (see probe_* below)
set -Eeuo pipefail
N=${N:-1000000}
BATCH=${BATCH:-100}
SRC_PORT=${SRC_PORT:-56532}
SINK_PORT=${SINK_PORT:-56533}
OUT_JSON=${OUT_JSON:-./native-backlog.json}
PROBE=${PROBE:-}
PROBE_OUT=${PROBE_OUT:-./native-backlog-probe.txt}
. "$(dirname "$(readlink -f "$0")")/clusters.sh"
. "$(dirname "$(readlink -f "$0")")/crm-orders.sh"
clusters_init native-backlog
tpid=
# A daemon left running by a failed step would reconnect to the next run's
# clusters on the same ports and drain them beside that run's daemon: stop it
# with the clusters.
cleanup() {
  [ -n "$tpid" ] && kill -TERM "$tpid" 2>/dev/null && wait "$tpid" 2>/dev/null || true
  clusters_stop
}
trap cleanup EXIT
start() { # name port [postgresql.conf line..]
  cluster_start "$1" "$2" "shared_buffers = 512MB" "max_wal_size = 8GB" "${@:3}"
}
q() { local port=$1; shift; psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres -At "$@"; }
# The probes (PROBE=1), taken around Tributary's drain only. They answer "where
# did the time go" without a profiler: CPU per daemon thread and per server
# process (from /proc), the store's statements (pg_stat_statements) and table
# activity (HOT updates, index scans), and the store's WAL by record type
# (pg_waldump), which is where rows written, index entries and WAL volume show.
probe_cpu() { # prints "key ticks" per daemon thread and per server process
  local t c pm pid
  for t in /proc/"$tpid"/task/*; do
    echo "daemon:$(cat "$t/comm" 2>/dev/null):${t##*/} $(awk '{print $14 + $15}' "$t/stat" 2>/dev/null || echo 0)"
  done
  for c in src sink; do
    pm=$(head -1 "$TMP/$c/postmaster.pid")
    for pid in $(pgrep -P "$pm"); do
      echo "$c:$pid $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)"
    done
  done
}
probe_start() {
  psql -X -q -h 127.0.0.1 -p "$SINK_PORT" -U postgres -d profiles -c "create extension if not exists pg_stat_statements" \
    -c "select pg_stat_statements_reset()" -c "select pg_stat_reset()" >/dev/null || true
  wal0=$(q "$SINK_PORT" -c "select pg_current_wal_lsn()")
}
probe_stop() { # at the end of the drain, before anything else runs
  local k
  wal1=$(q "$SINK_PORT" -c "select pg_current_wal_lsn()")
  probe_cpu >"$TMP/cpu1"
  while read -r k _; do # what each server process was (they exit with the daemon)
    case $k in src:* | sink:*) echo "$k $(tr '\0' ' ' <"/proc/${k#*:}/cmdline" 2>/dev/null | awk '{print $2, $3, $4}')" ;; esac
  done <"$TMP/cpu1" >"$TMP/labels"
}
probe_end() { # $1: the drain's seconds; after the daemon stopped (its sessions flushed their statistics)
  local k label
  {
    echo "== CPU during the drain ($1 s), % of one core, busiest first"
    awk -v s="$1" -v hz="$HZ" 'NR == FNR { a[$1] = $2; next } { d = $2 - a[$1]; if (d > 0) printf "%6.1f %s\n", 100 * d / hz / s, $1 }' \
      "$TMP/cpu0" "$TMP/cpu1" | sort -rn | head -20 | while read -r pct k; do
      label=$(awk -v k="$k" '$1 == k { $1 = ""; print }' "$TMP/labels")
      echo "$pct% $k$label"
    done
    echo
    echo "== the store's statements (pg_stat_statements; time includes waiting for the client)"
    psql -X -h 127.0.0.1 -p "$SINK_PORT" -U postgres -d profiles -c "select round(total_exec_time::numeric / 1000, 2) as s, calls, rows,
        left(regexp_replace(query, '\\s+', ' ', 'g'), 100) as statement
      from pg_stat_statements where dbid = (select oid from pg_database where datname = 'profiles')
      order by total_exec_time desc limit 12" || true
    echo "== the store's tables"
    psql -X -h 127.0.0.1 -p "$SINK_PORT" -U postgres -d profiles -c "select relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, idx_scan
      from pg_stat_user_tables where n_tup_ins + n_tup_upd > 0 order by relname" || true
    echo "== the store's WAL during the drain ($wal0 to $wal1), by record type"
    "${RUNAS[@]}" "$PGBIN/pg_waldump" -p "$TMP/sink/pg_wal" -s "$wal0" -e "$wal1" --stats=record 2>&1 \
      | grep -v '^first record' | awk 'NR <= 2 || $2 + 0 >= 1000' || true
  } >"$PROBE_OUT"
}
now() { date +%s.%N; }
# Returns once slot $1 confirmed the source's WAL end ($end_lsn). One session
# polls inside the server every 50 ms: a psql per poll (a Perl wrapper, a new
# backend) cost a quarter of the two cores while the drain ran.
wait_confirmed() {
  q "$SRC_PORT" -c "do \$\$ begin
    while not coalesce((select confirmed_flush_lsn >= '$end_lsn' from pg_replication_slots where slot_name = '$1'), false) loop
      perform pg_sleep(0.05);
    end loop;
  end \$\$"
}

start src "$SRC_PORT"
if [ -n "$PROBE" ]; then
  # Statement statistics on the sink cluster (for native apply too, so both
  # pay the same small overhead).
  start sink "$SINK_PORT" "shared_preload_libraries = 'pg_stat_statements'" "pg_stat_statements.track = all"
else
  start sink "$SINK_PORT"
fi

q "$SRC_PORT" -c "$BENCH_SCHEMA" -c "create publication bench for table contacts, orders"
q "$SINK_PORT" -c "$BENCH_SCHEMA"
q "$SINK_PORT" -c "create subscription bench connection 'host=127.0.0.1 port=$SRC_PORT user=postgres dbname=postgres' publication bench with (copy_data = false)" 2>/dev/null
q "$SINK_PORT" -c "alter subscription bench disable"
q "$SRC_PORT" -c "select pg_create_logical_replication_slot('peek', 'pgoutput')" >/dev/null

if [ -n "${TRIBUTARY:-}" ]; then
  q "$SINK_PORT" -c "create database profiles"
  bench_config "$SRC_PORT" "$SINK_PORT" >"$TMP/tributary.toml"
  # first run: migrate, create slot and publication, snapshot the empty tables; then stop
  "$TRIBUTARY" run --config "$TMP/tributary.toml" >"$TMP/tributary.log" 2>&1 &
  tpid=$!
  for _ in $(seq 1 300); do
    [ "$(q "$SRC_PORT" -c "select count(*) from pg_replication_slots where slot_name <> 'peek' and slot_name <> 'bench'")" -ge 1 ] && break
    sleep 0.1
  done
  sleep 2; kill -TERM "$tpid"; wait "$tpid" || true
fi

# Workload: N row changes. A quarter contact inserts, a quarter order inserts, then updates.
quarter=$((N / 4)); txns=$((quarter / BATCH))
t0=$(now)
q "$SRC_PORT" -c "
do \$\$ declare t int; begin
  for t in 0..$((txns - 1)) loop
    insert into contacts select g, 'user'||g||'@example.com', 'F'||g, 'L'||g, '+1'||g, g % 2 = 0
      from generate_series(t*$BATCH + 1, (t+1)*$BATCH) g;
    commit;
  end loop;
  for t in 0..$((txns - 1)) loop
    insert into orders select g, 1 + (g % $quarter), 'paid', g % 10000
      from generate_series(t*$BATCH + 1, (t+1)*$BATCH) g;
    commit;
  end loop;
  for t in 0..$((txns - 1)) loop
    update contacts set phone = phone||'x', version = version + 1, updated_at = now()
      where id between t*$BATCH + 1 and (t+1)*$BATCH;
    commit;
  end loop;
  for t in 0..$((txns - 1)) loop
    update orders set status = 'shipped', updated_at = now() where id between t*$BATCH + 1 and (t+1)*$BATCH;
    commit;
  end loop;
end \$\$"
t1=$(now)
end_lsn=$(q "$SRC_PORT" -c "select pg_current_wal_lsn()")
rows=$((txns * BATCH * 4))
write_s=$(awk "BEGIN{print $t1 - $t0}")

# Server-side decode ceiling.
t0=$(now)
msgs=$(q "$SRC_PORT" -c "select count(*) from pg_logical_slot_peek_binary_changes('peek', null, null, 'proto_version', '1', 'publication_names', 'bench')")
t1=$(now)
decode_s=$(awk "BEGIN{print $t1 - $t0}")
q "$SRC_PORT" -c "select pg_drop_replication_slot('peek')" >/dev/null

# Native apply of the backlog.
# (timed from the moment the apply worker is up, so the launcher's start-up delay is not counted)
q "$SINK_PORT" -c "alter subscription bench enable"
until [ -n "$(q "$SINK_PORT" -c "select pid from pg_stat_subscription where subname = 'bench' and pid is not null")" ]; do sleep 0.02; done
t0=$(now)
src_cpu0=$(cluster_cpu src); sink_cpu0=$(cluster_cpu sink)
wait_confirmed bench &
waiter=$!
wait "$waiter"
t1=$(now)
apply_s=$(awk "BEGIN{print $t1 - $t0}")
native_src_cpu=$(( $(cluster_cpu src) - src_cpu0 )); native_sink_cpu=$(( $(cluster_cpu sink) - sink_cpu0 ))
check=$(q "$SINK_PORT" -c "select count(*) from orders where status = 'shipped'")
[ "$check" = "$((txns * BATCH))" ] || { echo "native apply incomplete: $check shipped orders" >&2; exit 1; }

if [ -n "${TRIBUTARY:-}" ]; then
  [ -z "$PROBE" ] || probe_start
  t0=$(now)
  src_cpu0=$(cluster_cpu src); sink_cpu0=$(cluster_cpu sink)
  "$TRIBUTARY" run --config "$TMP/tributary.toml" >>"$TMP/tributary.log" 2>&1 &
  tpid=$!
  [ -z "$PROBE" ] || probe_cpu >"$TMP/cpu0"
  want=$((txns * BATCH))
  wait_confirmed tributary_crm &
  waiter=$!
  finished=
  wait -n -p finished "$waiter" "$tpid" || true
  t1=$(now)
  [ -z "$PROBE" ] || [ "$finished" != "$waiter" ] || probe_stop
  [ "$finished" = "$waiter" ] || { echo "tributary exited; log tail:" >&2; tail -5 "$TMP/tributary.log" >&2; exit 1; }
  trib_s=$(awk "BEGIN{print $t1 - $t0}")
  trib_cpu=$(proc_cpu "$tpid")
  trib_src_cpu=$(( $(cluster_cpu src) - src_cpu0 )); trib_sink_cpu=$(( $(cluster_cpu sink) - sink_cpu0 ))
  got=$(psql -X -At -h 127.0.0.1 -p "$SINK_PORT" -U postgres -d profiles -c "select coalesce(sum((traits->>'shipped_orders')::bigint), 0) from tributary.profiles")
  [ "$got" = "$want" ] || { echo "tributary store incomplete: $got of $want shipped orders" >&2; exit 1; }
  rss=$(awk '/VmHWM/ {print $2}' /proc/$tpid/status 2>/dev/null || echo 0)
  kill -TERM "$tpid"; wait "$tpid" || true
  [ -z "$PROBE" ] || probe_end "$trib_s"
fi

rate() { awk "BEGIN{printf \"%d\", $1 / $2}"; }
printf 'workload  %9d rows %8.2f s %9d rows/s  (source writes, %d rows/txn)\n' "$rows" "$write_s" "$(rate "$rows" "$write_s")" "$BATCH"
printf 'decode    %9d rows %8.2f s %9d rows/s  (server pgoutput decode, %d messages)\n' "$rows" "$decode_s" "$(rate "$rows" "$decode_s")" "$msgs"
printf 'native    %9d rows %8.2f s %9d rows/s  (logical replication drains the backlog into the sink)\n' "$rows" "$apply_s" "$(rate "$rows" "$apply_s")"
if [ -n "${TRIBUTARY:-}" ]; then
  printf 'tributary %9d rows %8.2f s %9d rows/s  (drains the same backlog into the profile store; peak RSS %d MiB)\n' "$rows" "$trib_s" "$(rate "$rows" "$trib_s")" "$((rss / 1024))"
  printf 'ratio     %s  (tributary rows/s / native rows/s)\n' "$(awk "BEGIN{printf \"%.2f\", $apply_s / $trib_s}")"
fi
# Where the CPU went while each drained (two cores shared by everything here):
# what a faster write path has to save, and steadier than the wall time.
printf 'cpu       native: sink %s s, source %s s' "$(secs "$native_sink_cpu")" "$(secs "$native_src_cpu")"
if [ -n "${TRIBUTARY:-}" ]; then
  printf '; tributary: daemon %s s, store %s s, source %s s' "$(secs "$trib_cpu")" "$(secs "$trib_sink_cpu")" "$(secs "$trib_src_cpu")"
fi
printf '\n'
[ -z "$PROBE" ] || [ -z "${TRIBUTARY:-}" ] || echo "probe     written to $PROBE_OUT"
trib_json=
if [ -n "${TRIBUTARY:-}" ]; then
  trib_json=",
 \"tributary_apply_s\": $trib_s, \"tributary_rows_per_s\": $(rate "$rows" "$trib_s"), \"tributary_peak_rss_kib\": $rss,
 \"tributary_cpu_s\": {\"daemon\": $(secs "$trib_cpu"), \"store\": $(secs "$trib_sink_cpu"), \"source\": $(secs "$trib_src_cpu")}"
fi
cat >"$OUT_JSON" <<EOF
{"rows": $rows, "batch": $BATCH, "write_s": $write_s, "decode_s": $decode_s, "native_apply_s": $apply_s,
 "decode_rows_per_s": $(rate "$rows" "$decode_s"), "native_apply_rows_per_s": $(rate "$rows" "$apply_s"),
 "native_cpu_s": {"sink": $(secs "$native_sink_cpu"), "source": $(secs "$native_src_cpu")}$trib_json}
EOF
