#!/usr/bin/env bash
# Latency benchmark: a steady stream of source changes (pgbench's built-in
# `simple-update` script: one UPDATE of pgbench_accounts and one INSERT into
# pgbench_history per transaction, so RATE transactions/s are 2 x RATE changes/s)
# for SECS seconds, mapped to profiles (account -> balance; history -> count and
# sum of deltas). Reports the p50 and p99 time from source commit to profile
# committed, read from the daemon's own histogram
# (tributary_end_to_end_latency_seconds, the difference between a scrape before
# and one after the run), then checks that the store equals the source.
#
#   benches/latency.sh                       # 2,500 txn/s = 5,000 changes/s for 30 s
#   RATE=1000 SECS=10 benches/latency.sh
#
# Needs the PostgreSQL server binaries (initdb, pg_ctl, pgbench) and psql.
# Writes target/bench/latency.json.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
RATE=${RATE:-2500}
SECS=${SECS:-30}
SCALE=${SCALE:-1}
SRC_PORT=${SRC_PORT:-56542}
SINK_PORT=${SINK_PORT:-56543}
METRICS_PORT=${METRICS_PORT:-56544}
cargo build --release --quiet
mkdir -p target/bench
BIN=$root/target/release/tributary
. "$root/benches/clusters.sh"
clusters_init tributary-latency
tpid=
cleanup() {
  [ -n "$tpid" ] && kill -TERM "$tpid" 2>/dev/null && wait "$tpid" 2>/dev/null || true
  clusters_stop
}
trap cleanup EXIT
start() { # name port
  cluster_start "$1" "$2" "shared_buffers = 256MB"
}
q() { local port=$1; shift; psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres -At "$@"; }
scrape() { # prints the end-to-end histogram's bucket lines
  exec 3<>"/dev/tcp/127.0.0.1/$METRICS_PORT"
  printf 'GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n' >&3
  grep '^tributary_end_to_end_latency_seconds_bucket' <&3 || true
  exec 3<&-
}

start src "$SRC_PORT"
start sink "$SINK_PORT"
"$PGBIN/pgbench" -i -q -s "$SCALE" -h 127.0.0.1 -p "$SRC_PORT" -U postgres postgres >/dev/null 2>&1
# pgbench_history has no key; Tributary needs one for a mapped table.
q "$SRC_PORT" -c "alter table pgbench_history add column hid bigserial primary key"
q "$SINK_PORT" -c "create database profiles"
cat >"$TMP/tributary.toml" <<CONF
[sink]
url = "postgres://postgres@127.0.0.1:$SINK_PORT/profiles"
${SINK_EXTRA:-}

[[source]]
name = "bank"
url = "postgres://postgres@127.0.0.1:$SRC_PORT/postgres"
  [[source.table]]
  name = "public.pgbench_accounts"
  identity = { account = "aid" }
  fields = { balance = "abalance", branch = "bid" }
  [[source.table]]
  name = "public.pgbench_history"
  identity = { account = "aid" }
  [source.table.aggregates]
  transactions = { fn = "count" }
  delta_total = { fn = "sum", column = "delta" }

[metrics]
listen = "127.0.0.1:$METRICS_PORT"
CONF
RUST_LOG=${RUST_LOG:-info} "$BIN" run --config "$TMP/tributary.toml" >"$TMP/tributary.log" 2>&1 &
tpid=$!
accounts=$((SCALE * 100000))
for _ in $(seq 1 600); do
  got=$(psql -X -At -h 127.0.0.1 -p "$SINK_PORT" -U postgres -d profiles -c "select count(*) from tributary.checkpoints where snapshot_completed_at is not null" 2>/dev/null || echo 0)
  [ "$got" = 1 ] && break
  kill -0 "$tpid" || { tail -5 "$TMP/tributary.log" >&2; exit 1; }
  sleep 0.5
done
sleep 2 # streaming
before=$(scrape)
cpu0=$(proc_cpu "$tpid"); sink_cpu0=$(cluster_cpu sink); src_cpu0=$(cluster_cpu src)
"$PGBIN/pgbench" -n -b simple-update -R "$RATE" -T "$SECS" -c 8 -j 2 -h 127.0.0.1 -p "$SRC_PORT" -U postgres postgres >"$TMP/pgbench.out" 2>&1
txns=$(awk '/number of transactions actually processed/ {print $NF}' "$TMP/pgbench.out" | cut -d/ -f1)
[ -n "$txns" ] || { cat "$TMP/pgbench.out" >&2; exit 1; }
# Wait until the store has every history row, then scrape again.
want=$(q "$SRC_PORT" -c "select count(*) from pgbench_history")
for _ in $(seq 1 600); do
  got=$(psql -X -At -h 127.0.0.1 -p "$SINK_PORT" -U postgres -d profiles -c "select coalesce(sum((traits->>'transactions')::bigint), 0) from tributary.profiles" 2>/dev/null || echo 0)
  [ "$got" = "$want" ] && break
  sleep 0.2
done
after=$(scrape)
daemon_cpu=$(( $(proc_cpu "$tpid") - cpu0 )); sink_cpu=$(( $(cluster_cpu sink) - sink_cpu0 )); src_cpu=$(( $(cluster_cpu src) - src_cpu0 ))
rss=$(awk '/VmHWM/ {print $2}' "/proc/$tpid/status" 2>/dev/null || echo 0)

# p50/p99 from the difference of the two scrapes (cumulative buckets).
quantiles=$(printf '%s\n--\n%s\n' "$before" "$after" | awk '
  /^--$/ { second = 1; next }
  { match($0, /le="[^"]*"/); le = substr($0, RSTART + 4, RLENGTH - 5); v = $NF
    if (second) { a[le] = v; order[++n] = le } else { b[le] = v } }
  END {
    total = a["+Inf"] - b["+Inf"]
    split("0.5 0.99", qs, " ")
    for (k = 1; k <= 2; k++) {
      want = qs[k] * total; prev_le = 0; prev_c = 0; out = "inf"
      for (i = 1; i <= n; i++) {
        le = order[i]; c = a[le] - b[le]
        if (c >= want) {
          if (le == "+Inf") { out = "inf" } else if (c == prev_c) { out = le } else {
            out = prev_le + (le - prev_le) * (want - prev_c) / (c - prev_c) }
          break
        }
        if (le != "+Inf") { prev_le = le; prev_c = c }
      }
      printf "%s ", out
    }
    printf "%d\n", total
  }')
read -r p50 p99 observed <<<"$quantiles"

# The store equals the source: every balance, and history count and sum per account.
src_sum=$(q "$SRC_PORT" -c "select md5(string_agg(aid || ':' || abalance || ':' || coalesce(n, 0) || ':' || coalesce(s, 0), ',' order by aid))
  from pgbench_accounts a left join (select aid, count(*) n, sum(delta) s from pgbench_history group by aid) h using (aid)")
sink_sum=$(psql -X -At -h 127.0.0.1 -p "$SINK_PORT" -U postgres -d profiles -c "select md5(string_agg(i.value || ':' || (p.traits->>'balance') || ':' || coalesce(p.traits->>'transactions', '0') || ':' || coalesce(p.traits->>'delta_total', '0'), ',' order by i.value::bigint))
  from tributary.identities i join tributary.profiles p using (profile_id) where i.kind = 'account'")
equal=false; [ "$src_sum" = "$sink_sum" ] && equal=true

ms() { awk "BEGIN { if (\"$1\" == \"inf\") print \"inf\"; else printf \"%.1f\", $1 * 1000 }"; }
printf 'load      %d transactions (%d changes) in %d s at %d txn/s requested, %d accounts\n' "$txns" $((txns * 2)) "$SECS" "$RATE" "$accounts"
# A run where pgbench itself could not keep the requested rate measured a
# saturated machine: say so next to the figures instead of leaving it to be
# inferred from the transaction count.
reached=$((txns * 100 / (RATE * SECS)))
if [ "$reached" -lt 95 ]; then
  printf 'warning   pgbench reached only %d%% of the requested rate: the cores are saturated and the latency below is mostly queueing (see the cpu line)\n' "$reached"
fi
printf 'latency   p50 %s ms, p99 %s ms from source commit to profile committed (%d commits observed)\n' "$(ms "$p50")" "$(ms "$p99")" "$observed"
printf 'store     equal to the source: %s; peak RSS %d MiB\n' "$equal" $((rss / 1024))
# Two cores are shared by pgbench, both servers and the daemon: the CPU each
# used during the run says how close to saturation the latency was measured.
printf 'cpu       daemon %s s, store %s s, source %s s (pgbench backends, WAL sender), over %d s on 2 cores\n' \
  "$(secs "$daemon_cpu")" "$(secs "$sink_cpu")" "$(secs "$src_cpu")" "$SECS"
cat >"$root/target/bench/latency.json" <<JSON
{"rate_txn_per_s": $RATE, "secs": $SECS, "transactions": $txns, "rate_reached_pct": $reached, "p50_s": "$p50", "p99_s": "$p99", "observed_commits": $observed, "store_equal": $equal, "peak_rss_kib": $rss,
 "cpu_s": {"daemon": $(secs "$daemon_cpu"), "store": $(secs "$sink_cpu"), "source": $(secs "$src_cpu")}}
JSON
[ "$equal" = true ] || { echo "the store differs from the source" >&2; exit 1; }
