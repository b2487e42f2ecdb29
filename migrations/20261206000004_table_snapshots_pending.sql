-- Mapped tables whose rows must be read again because the publication did
-- not carry their changes for a while: a table newly mapped on a source that
-- already streams, or one removed from the publication and added back. The
-- daemon records one when it adds the table to the publication, re-snapshots
-- it (watermarked, while it streams) and deletes the row once that is done,
-- so a crash in between only means it starts over.
create table table_snapshots_pending (
    source     text not null,
    table_name text not null,
    since      timestamptz not null default now(),
    primary key (source, table_name)
);
