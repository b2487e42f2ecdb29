-- The daemon's own bookkeeping columns become `json` (issue 11; measured in
-- docs/design.md, "Throughput", twelfth session).
--
-- A contribution's identifiers, field values and aggregate inputs, and a
-- profile's aggregate state, are written by the daemon on every change that
-- touches them (a million contribution writes and a million profile writes in
-- the 1M backlog) and read back only by the daemon, whole. As `jsonb` the
-- server parsed each value into its binary form on the way in and printed it
-- back on the way out; as `json` it checks the syntax and keeps the text.
-- Nothing indexes or searches inside them. `profiles.traits`, the contract's
-- column that people query, stays `jsonb`.
--
-- For a query by hand: `->`, `->>`, `json_each` and `json_array_elements`
-- read them as before; containment, `?` and `=` need a cast (`fields::jsonb`).
alter table contributions
    alter column identities type json using identities::json,
    alter column fields type json using fields::json,
    alter column aggs type json using aggs::json;
alter table profiles
    alter column agg_state type json using agg_state::json;
