# Sourced by benches/native-backlog.sh and benches/kafka.sh: the source schema
# their workload writes (CRM contacts and shop orders) and Tributary's mapping
# of it, so that both benchmarks measure the same thing.
#
#   BENCH_SCHEMA    the two tables, for the source (and a native subscriber)
#   bench_tables    prints the [[source.table]] sections of the mapping
#   bench_config SRC_PORT SINK_PORT
#                   prints Tributary's config: source `crm` on the first, the
#                   store (database `profiles`) on the second, $SINK_EXTRA lines
#                   in [sink]

BENCH_SCHEMA="
create table contacts(id bigint primary key, email text, first_name text, last_name text, phone text,
  opted_in boolean, updated_at timestamptz not null default now(), version bigint not null default 1);
create table orders(id bigint primary key, contact_id bigint not null, status text not null,
  total_cents bigint not null, created_at timestamptz not null default now(), updated_at timestamptz not null default now());"

bench_tables() {
  cat <<'TABLES'
  [[source.table]]
  name = "public.contacts"
  identity = { email = "email", contact = "id" }
  version = "version"
  updated_at = "updated_at"
  fields = { email = "email", first_name = "first_name", last_name = "last_name", phone = "phone", opted_in = "opted_in" }

  [[source.table]]
  name = "public.orders"
  identity = { contact = "contact_id" }
  updated_at = "updated_at"
  [source.table.aggregates]
  order_count = { fn = "count" }
  shipped_orders = { fn = "count", only_when = { status = ["shipped"] } }
  lifetime_value_cents = { fn = "sum", column = "total_cents" }
TABLES
}

bench_config() {
  cat <<EOF
[sink]
url = "postgres://postgres@127.0.0.1:$2/profiles"
${SINK_EXTRA:-}

[[source]]
name = "crm"
url = "postgres://postgres@127.0.0.1:$1/postgres"

$(bench_tables)
EOF
}
