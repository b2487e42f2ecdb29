-- Which server a source's checkpoint came from: its system identifier and
-- timeline (IDENTIFY_SYSTEM). A restore, a move to another cluster or a
-- failover can give a source positions that do not continue the ones the
-- checkpoint holds; streaming from the checkpoint would then skip changes.
-- The daemon compares at every connect and stops with the way forward.
-- NULL until the first connect of a binary that records them.
alter table checkpoints add column system_id text null, add column timeline bigint null;
