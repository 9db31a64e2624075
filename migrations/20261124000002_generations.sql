-- One row per published weights generation: makes a generation number unique (a second
-- publish of the same number fails as a whole) and records when and by which run.
CREATE TABLE generations (
    generation BIGINT PRIMARY KEY,
    created_at_ms BIGINT NOT NULL,
    solver_run_id BIGINT NOT NULL
);
