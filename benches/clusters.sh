# Sourced by the benchmark scripts: throwaway PostgreSQL clusters on loopback,
# run as the `postgres` OS user when we are root (the server refuses root).
#
#   clusters_init NAME              sets PGBIN, TMP (a new /tmp/NAME.XXXXXX) and RUNAS
#   cluster_start DIR PORT [LINE..] initdb + start, with wal_level = logical and the
#                                   extra postgresql.conf lines given
#   clusters_stop                   stops every cluster under TMP and removes it
#   cluster_cpu DIR                 CPU ticks (user + system) the cluster used so far:
#                                   the postmaster, its live children and those it reaped
#   proc_cpu PID                    CPU ticks one process used so far
#   secs TICKS                      ticks as seconds, one decimal

clusters_init() {
  PGBIN=${PGBIN:-$(dirname "$(readlink -f "$(command -v pg_ctl || ls /usr/lib/postgresql/*/bin/pg_ctl | tail -1)")")}
  TMP=$(mktemp -d "/tmp/$1.XXXXXX")
  RUNAS=()
  if [ "$(id -u)" = 0 ]; then RUNAS=(runuser -u postgres --); chown postgres "$TMP"; fi
}

cluster_start() {
  local dir=$1 port=$2
  shift 2
  "${RUNAS[@]}" "$PGBIN/initdb" -D "$TMP/$dir" -A trust -U postgres >/dev/null
  printf '%s\n' "port = $port" "listen_addresses = '127.0.0.1'" "unix_socket_directories = '$TMP'" \
    "wal_level = logical" "max_replication_slots = 10" "max_wal_senders = 10" "$@" >>"$TMP/$dir/postgresql.conf"
  # The log goes with the cluster directory on exit: show why it did not start.
  "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$TMP/$dir" -l "$TMP/$dir.log" -w start >/dev/null || {
    echo "cluster $dir (port $port) did not start; the end of its log:" >&2
    tail -20 "$TMP/$dir.log" >&2
    return 1
  }
}

clusters_stop() {
  local d
  for d in "$TMP"/*/; do
    [ -f "$d/PG_VERSION" ] && { "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true; }
  done
  rm -rf "$TMP"
}

HZ=$(getconf CLK_TCK)
cluster_cpu() {
  local pm total pid
  pm=$(head -1 "$TMP/$1/postmaster.pid")
  total=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$pm/stat")
  for pid in $(pgrep -P "$pm"); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}

proc_cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }

secs() { awk "BEGIN{printf \"%.1f\", $1 / $HZ}"; }
