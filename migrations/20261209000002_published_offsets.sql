-- Where a `run --role capture` process has published each source's changes:
-- per change-topic partition, the offset after the last message it published,
-- written in the same transaction as the checkpoint that covers those
-- messages. A command that must wait until the store has applied a source up
-- to some position (`reconcile`, `snapshot`) waits, in a deployment split
-- over Kafka, until the apply owner's `consumer_offsets` reach these: the
-- capture's checkpoint alone says "published", not "applied".
create table published_offsets (
    source      text not null,
    topic       text not null,
    partition   int not null,
    next_offset bigint not null,
    updated_at  timestamptz not null default now(),
    primary key (topic, partition)
);
