-- A digest of the mapped columns of each row's latest image, as the source
-- computes it in SQL: the sum of `hashtextextended('col=' || text, 0)` over the
-- columns the mapping reads (`col` alone for null), folded into a bigint. `tributary reconcile` compares sums of
-- these per key bucket with the same sums computed on the source, and reads
-- rows only for the buckets that differ. NULL when unknown (an update that left
-- a mapped TOAST value unchanged, or a row written before this migration): the
-- bucket is then compared row by row.
alter table contributions add column digest bigint null;

-- Keys of the events of a source that a re-snapshot or a reconciliation must
-- look up by transaction (the watermark window, see docs/design.md).
create index events_source_xid on events (source, xid);

-- Rows a run could not compare because they kept changing under it.
alter table reconcile_runs add column unverified bigint not null default 0;

-- Whether `--repair` fixed the drift (checked again after the repair).
alter table reconcile_drift add column repaired boolean not null default false;
