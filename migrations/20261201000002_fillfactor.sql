-- Leave room on every page of the two tables the apply path updates in place,
-- so that an update can stay on its page (a HOT update: no new index entries)
-- when it changes no indexed column, which is the common case: a profile's
-- traits, aggregates and provenance, a row's contribution under the same
-- profile. Applies to pages written from now on; `VACUUM FULL` applies it to
-- existing ones.
alter table profiles set (fillfactor = 70);
alter table contributions set (fillfactor = 70);
