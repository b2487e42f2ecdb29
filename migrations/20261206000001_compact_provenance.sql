-- `profiles.provenance` names each winning row once (issue 11; measured in
-- docs/design.md, "Throughput", fourteenth session).
--
-- Before: an object by field, each entry repeating its row, freshness and LSN:
--   {"email": {"v": …, "s": "crm", "t": "public.contacts", "k": "{\"id\":1}", "f": …, "l": …},
--    "phone": {"v": …, "s": "crm", "t": "public.contacts", "k": "{\"id\":1}", "f": …, "l": …}}
-- After: an array of groups, one per winning row (and freshness and LSN), each
-- with the values it won by field:
--   [{"s": "crm", "t": "public.contacts", "k": "{\"id\":1}", "f": …, "l": …,
--     "v": {"email": …, "phone": …}}]
--
-- Why: a contact's five fields all won from its one row, so the row was named
-- five times; the document was 625 of a profile row's 973 bytes. Every write of
-- a profile (about a million in the 1M backlog, aggregate-only ones included)
-- rewrites the whole row, and `wal_level = logical` logs it whole.
-- `profile_fields` keeps its columns and meaning; only the document changes.
update profiles p
   set provenance = coalesce(
         (select json_agg(json_build_object('s', g.s, 't', g.t, 'k', g.k, 'f', g.f, 'l', g.l, 'v', g.v)
                          order by g.first_field)
            from (select e.value ->> 's' as s, e.value ->> 't' as t, e.value ->> 'k' as k,
                         e.value ->> 'f' as f, e.value ->> 'l' as l,
                         json_object_agg(e.key, e.value -> 'v' order by e.key) as v,
                         min(e.key) as first_field
                    from json_each(p.provenance) as e
                   group by 1, 2, 3, 4, 5) as g),
         '[]')
 where json_typeof(p.provenance) = 'object';

alter table profiles alter column provenance set default '[]';

create or replace view profile_fields as
select p.profile_id,
       v.key                          as field,
       v.value::jsonb                 as value,
       g.value ->> 's'                as source,
       g.value ->> 't'                as table_name,
       g.value ->> 'k'                as row_key,
       (g.value ->> 'f')::timestamptz as freshness,
       (g.value ->> 'l')::pg_lsn      as lsn
  from profiles p
 cross join lateral json_array_elements(p.provenance) as g(value)
 cross join lateral json_each(g.value -> 'v') as v(key, value);
