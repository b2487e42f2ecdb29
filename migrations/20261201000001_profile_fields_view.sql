-- Provenance moves into the profile row: `profiles.provenance` holds, per winning
-- field, {"v": value, "s": source, "t": table_name, "k": row_key, "f": freshness,
-- "l": lsn}, and `profile_fields` becomes a view over it with the same columns.
--
-- Why: one provenance row per field was the largest write of the apply path
-- (five index-maintained rows per contact, each an ON CONFLICT probe); as one
-- `json` column of the row the batch writes anyway it costs one validation.
-- `json` rather than `jsonb`: it is written far more often than it is read.
alter table profiles add column provenance json not null default '{}';

update profiles p
   set provenance = f.doc
  from (select profile_id,
               json_object_agg(field, json_build_object('v', value, 's', source, 't', table_name, 'k', row_key,
                                                         'f', freshness, 'l', lsn::text) order by field) as doc
          from profile_fields
         group by profile_id) f
 where f.profile_id = p.profile_id;

drop table profile_fields;

create view profile_fields as
select p.profile_id,
       f.key                         as field,
       (f.value -> 'v')::jsonb       as value,
       f.value ->> 's'               as source,
       f.value ->> 't'               as table_name,
       f.value ->> 'k'               as row_key,
       (f.value ->> 'f')::timestamptz as freshness,
       (f.value ->> 'l')::pg_lsn     as lsn
  from profiles p
 cross join lateral json_each(p.provenance) as f(key, value);
