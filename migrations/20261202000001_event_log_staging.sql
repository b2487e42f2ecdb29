-- The event log is appended with binary COPY (src/store/event_log.rs). When a
-- batch meets changes that are logged already (it is written again after its
-- log committed and its derived rows did not), the same rows go through this
-- table into `insert … on conflict do nothing`, which keeps the logged copies.
-- Rows are deleted in the transaction that copied them, so it is empty outside
-- one; unlogged, since it never holds anything a crash could need.
create unlogged table event_log_staging as
    select source, lsn, commit_lsn, seq, xid, commit_time, table_name, op, key, row, unchanged
      from events
      with no data;
