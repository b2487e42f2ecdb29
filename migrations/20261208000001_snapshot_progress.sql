-- Progress of an initial snapshot, so that a daemon stopped in the middle of
-- one (a crash, a deploy) resumes it instead of reading every table again:
-- the tables whose rows were all written at the slot's consistent point
-- (`snapshot_lsn`). On restart, while the slot is still at that point, those
-- tables stay as they are and the rest are read again, watermarked, while the
-- stream runs (as `table_snapshots_pending` does for a table added later).
alter table checkpoints add column snapshot_tables_done text[] not null default '{}';
