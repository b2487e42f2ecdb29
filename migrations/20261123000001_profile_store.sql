-- The profile store. Every relation of the contract (shared/spec/interface.md),
-- plus `contributions`, the merge model's ground truth: the latest word of every
-- source row. Traits are a pure function of a profile's contributions.
--
-- Runs with search_path set to the configured schema (sink.schema).

create table profiles (
    profile_id  bigint primary key,
    traits      jsonb not null default '{}',
    created_at  timestamptz not null default now(),
    updated_at  timestamptz not null default now(),
    merged_into bigint null,
    -- running aggregate state per aggregate name: {"n": rows, "s": sum, "v": max/min}
    agg_state   jsonb not null default '{}'
);
create index profiles_merged_into on profiles (merged_into) where merged_into is not null;

create table identities (
    kind       text not null,
    value      text not null,
    profile_id bigint not null,
    created_at timestamptz not null default now(),
    primary key (kind, value)
);
create index identities_profile on identities (profile_id);

-- Provenance of every winning value in profiles.traits (fields, not aggregates).
create table profile_fields (
    profile_id bigint not null,
    field      text not null,
    value      jsonb not null,
    source     text not null,
    table_name text not null,
    row_key    text not null,
    freshness  timestamptz not null,
    lsn        pg_lsn not null,
    primary key (profile_id, field)
);

-- One row per source row ever seen (deleted rows stay as tombstones so that a
-- late, older change cannot resurrect them).
create table contributions (
    source     text not null,
    table_name text not null,
    row_key    text not null,
    profile_id bigint null,
    deleted    boolean not null default false,
    identities jsonb not null default '[]',   -- [[kind, normalized value], ...]
    fields     jsonb not null default '{}',   -- {field: value}, non-null values only
    aggs       jsonb not null default '{}',   -- {aggregate: input value} for rows that pass only_when
    version    bigint null,
    lsn        pg_lsn not null,               -- commit LSN of the change that wrote this
    seq        bigint not null,               -- position inside that transaction
    freshness  timestamptz not null,
    priority   integer not null,
    updated_at timestamptz not null default now(),
    primary key (source, table_name, row_key)
);
create index contributions_profile on contributions (profile_id) where profile_id is not null;

create table checkpoints (
    source                text primary key,
    lsn                   pg_lsn not null,
    updated_at            timestamptz not null default now(),
    slot                  text null,
    snapshot_lsn          pg_lsn null,
    snapshot_completed_at timestamptz null
);

-- The event log, partitioned by month of commit_time. Partitions are created
-- ahead of time by the daemon; the default partition only catches strays.
create table events (
    source      text not null,
    lsn         pg_lsn not null,
    commit_lsn  pg_lsn not null,
    seq         bigint not null,
    xid         bigint not null,
    commit_time timestamptz not null,
    table_name  text not null,
    op          text not null check (op in ('insert', 'update', 'delete', 'truncate', 'snapshot')),
    key         jsonb not null,
    row         jsonb null,
    unchanged   text[] null,
    primary key (source, commit_lsn, seq, commit_time)
) partition by range (commit_time);
create table events_default partition of events default;

create table dead_letters (
    id         bigserial primary key,
    source     text not null,
    lsn        pg_lsn null,
    table_name text not null,
    row        jsonb null,
    error      text not null,
    created_at timestamptz not null default now()
);

create table suppressions (
    kind       text not null,
    value      text not null,
    created_at timestamptz not null default now(),
    primary key (kind, value)
);

create table reconcile_runs (
    run_id           bigserial primary key,
    started_at       timestamptz not null default now(),
    finished_at      timestamptz null,
    source           text null,
    rows_checked     bigint not null default 0,
    profiles_checked bigint not null default 0,
    drift_count      bigint not null default 0,
    repaired_count   bigint not null default 0,
    status           text not null default 'running',
    as_of            jsonb not null default '{}'
);

create table reconcile_drift (
    run_id     bigint not null references reconcile_runs (run_id) on delete cascade,
    profile_id bigint null,
    field      text not null,
    expected   jsonb null,
    actual     jsonb null,
    kind       text not null check (kind in ('missing', 'extra', 'mismatch'))
);
create index reconcile_drift_run on reconcile_drift (run_id);

-- Live profiles with their identities, one row each: {"email": ["a@x.com"], ...}.
create view profile_view as
select p.profile_id,
       p.traits,
       coalesce((select jsonb_object_agg(k.kind, k.vals)
                   from (select i.kind, jsonb_agg(i.value order by i.value) as vals
                           from identities i
                          where i.profile_id = p.profile_id
                          group by i.kind) k), '{}'::jsonb) as identities,
       p.created_at,
       p.updated_at
  from profiles p
 where p.merged_into is null;
