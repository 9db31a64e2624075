-- `weights` is keyed by (generation, service, src, dst): its primary key already serves every
-- lookup and delete by generation, so the separate index on `generation` only slowed down
-- each publish (it is written once per row).
DROP INDEX weights_generation;
