-- Scale-out over Kafka: exactly one `run --role apply` instance writes profiles
-- at a time. It holds this lease and renews it; the others stand by and take
-- it once it has expired (the owner died) or was released (a clean stop).
-- `epoch` counts the owners: every write of an owner checks, inside its own
-- transaction, that the lease is still its epoch and unexpired, and holds the
-- row (FOR SHARE) until it commits, so a standby cannot take over between the
-- check and the commit: an owner that was only paused never writes after its
-- successor started.
create table apply_lease (
    name        text primary key,
    holder      text not null,
    epoch       bigint not null,
    group_id    text not null,
    acquired_at timestamptz not null default now(),
    expires_at  timestamptz not null
);

-- Where the owner is in each change topic's partitions: the next offset to
-- read, written in the same transaction as the changes before it. A new owner
-- starts from here, so a takeover neither loses nor re-applies a change (the
-- consumer group's own offsets in Kafka are committed too, after the store,
-- for monitoring tools; they are read only when this table has no row yet).
create table consumer_offsets (
    group_id    text not null,
    topic       text not null,
    partition   int not null,
    next_offset bigint not null,
    updated_at  timestamptz not null default now(),
    primary key (group_id, topic, partition)
);
