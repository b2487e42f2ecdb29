-- Identity follows the sources' current rows: a profile splits again when the
-- last row joining two groups of identifiers goes, and the group that came
-- from the smaller profile keeps its id. A merge re-points the loser's
-- identities and would forget where they came from, so each identity keeps
-- the profile it belonged to before merges moved it: null while that is its
-- current profile (so inserts need not say it), set by the merge that moves
-- it (`coalesce(first_profile_id, profile_id)`), reset to null when a split
-- moves it to a new profile. Stores built before this keep null everywhere:
-- their first split of a fused profile picks the part with the smallest
-- identifier (docs/operations.md, "Upgrading").
alter table identities add column first_profile_id bigint null;

-- A profile whose last identifier left (every row that joined it went) is no
-- one: its row stays (its id is never reused, and profiles merged into it
-- still point at it), with empty traits, but the view of live profiles
-- leaves it out.
create or replace view profile_view as
select p.profile_id,
       p.traits,
       coalesce((select jsonb_object_agg(k.kind, k.vals)
                   from (select i.kind, jsonb_agg(i.value order by i.value) as vals
                           from identities i
                          where i.profile_id = p.profile_id
                          group by i.kind) k), '{}'::jsonb) as identities,
       p.created_at,
       p.updated_at
  from profiles p
 where p.merged_into is null
   and exists (select 1 from identities i where i.profile_id = p.profile_id);
