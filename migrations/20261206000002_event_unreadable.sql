-- Columns of a change whose value could not be read as the server sent it
-- (bytes that are not UTF-8 from a SQL_ASCII database, JSON nested deeper than
-- the parser allows): `[[column, why], ...]`, NULL for every ordinary change.
-- `row` holds a stand-in for such a value, and the apply path sends a row
-- that maps one to dead_letters; with the column, `replay` and `rebuild` do
-- the same as the stream did. Adding a nullable column rewrites nothing.
alter table events add column unreadable jsonb null;
alter table event_log_staging add column unreadable jsonb null;
