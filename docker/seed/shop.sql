create table accounts (id bigint primary key, email text, phone text, created_at timestamptz not null default now());
create table orders (id bigint primary key, account_id bigint, status text not null, total_cents bigint not null,
  created_at timestamptz not null default now(), updated_at timestamptz not null default now());
-- accounts 1..800 are CRM contacts 201..1000 (same email, other case)
insert into accounts (id, email) select a, 'Person' || (a + 200) || '@Example.com' from generate_series(1, 800) a;
insert into orders (id, account_id, status, total_cents)
select o, 1 + o % 800, (array['paid','shipped','cancelled','pending'])[1 + o % 4], 1000 + o % 9000
  from generate_series(1, 3000) o;
