-- A counter that every writer of derived state (the apply path, replay,
-- rebuild, re-snapshot, forget, reconcile --repair; in any process) moves
-- forward under the apply lock. The daemon keeps the merge state in memory
-- as a write-back cache of the store (src/state/); it trusts that cache only
-- while the counter it reads under the lock is the one its own last commit
-- left. Anyone else's write moves it, and the cache is dropped and reloaded.
create table write_generation (
    one        boolean primary key default true check (one),
    generation bigint not null
);
insert into write_generation (one, generation) values (true, 0);
