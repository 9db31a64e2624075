-- Leadership of broker replicas: one lease row (id 1). A replica leads while it holds the
-- row (holder = its replica id) and the row has not expired; every take-over bumps the term,
-- and every publish is fenced by it (the publishing transaction locks the row and checks
-- holder and term). Times are milliseconds since the epoch of the DATABASE's clock on
-- PostgreSQL (replicas' clocks do not matter), of the process's clock on SQLite.
CREATE TABLE leader_lease (
    id INTEGER PRIMARY KEY,
    holder TEXT NOT NULL,
    term BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
INSERT INTO leader_lease (id, holder, term, expires_at_ms) VALUES (1, '', 0, 0);

-- The term of the leader that published each generation.
ALTER TABLE generations ADD COLUMN term BIGINT NOT NULL DEFAULT 0;
