-- A generation stores only the (service, source) pairs whose weights changed, and the weights
-- in force at generation G are each pair's newest rows up to G: index that lookup. Lookups and
-- deletes by generation alone use the primary key (generation, service, src, dst), so the
-- separate index on `generation` only slowed down every publish.
DROP INDEX weights_generation;
CREATE INDEX weights_pair ON weights (service, src, generation);
