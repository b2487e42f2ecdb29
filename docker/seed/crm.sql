create table contacts (id bigint primary key, email text, first_name text, last_name text, phone text,
  opted_in boolean not null default false, row_version bigint not null default 1,
  modified_at timestamptz not null default now());
insert into contacts (id, email, first_name, last_name, phone, opted_in)
select g, 'person' || g || '@example.com', 'First' || g, 'Last' || g, '+1 555 ' || lpad(g::text, 4, '0'), g % 2 = 0
  from generate_series(1, 1000) g;
