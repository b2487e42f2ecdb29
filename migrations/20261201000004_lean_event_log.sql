-- A leaner event log (issue 11; measured in docs/design.md, "Throughput").
--
-- `row` is kept as `json`: the text as received, stored without the parse
-- into jsonb's binary form that every logged change paid. It reads the same
-- (`row ->> 'email'`, `json_each(row)`); containment (`@>`) needs a cast,
-- `row::jsonb @> …`. `key` stays `jsonb`: it is small, and it is compared
-- whole (`key = '{"id": 1}'`), which `json` cannot do.
alter table events alter column row type json using row::json;

-- `applied_seq` is read only by `tributary rebuild`, once, in order, over the
-- whole log: it sorts the log itself (one sort per rebuild) instead of every
-- logged change paying for an index entry.
drop index events_applied_order;
