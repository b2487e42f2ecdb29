-- The order in which events were applied, so that `tributary rebuild` can apply
-- the log again in the same order (and so allocate the same profile ids).
create sequence events_applied_seq;
alter table events add column applied_seq bigint not null default nextval('events_applied_seq');
create index events_applied_order on events (applied_seq);
