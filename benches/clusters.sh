# Sourced by the benchmark scripts: throwaway PostgreSQL clusters on loopback,
# run as the `postgres` OS user when we are root (the server refuses root).
#
#   clusters_init NAME              sets PGBIN, TMP (a new /tmp/NAME.XXXXXX) and RUNAS
#   cluster_start DIR PORT [LINE..] initdb + start, with wal_level = logical and the
#                                   extra postgresql.conf lines given
#   clusters_stop                   stops every cluster under TMP and removes it

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
  "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$TMP/$dir" -l "$TMP/$dir.log" -w start >/dev/null
}

clusters_stop() {
  local d
  for d in "$TMP"/*/; do
    [ -f "$d/PG_VERSION" ] && { "${RUNAS[@]}" "$PGBIN/pg_ctl" -D "$d" -m immediate stop >/dev/null 2>&1 || true; }
  done
  rm -rf "$TMP"
}
