-- Retention (`--keep-generations`): after each publish the broker deletes the generations
-- older than the newest K from `weights`, `generations` and `solver_runs`. `weights` and
-- `generations` are already indexed by generation; this index lets the prune find the old
-- solver runs without scanning the table.
CREATE INDEX solver_runs_generation ON solver_runs (generation);
