-- What each agent (node) says its cluster imports. A node that declared has one row in
-- import_declarations (replaced on every report that carries a declaration) and one row in
-- imports per imported service; a cluster none of whose nodes declared is a source of every
-- service.
CREATE TABLE import_declarations (
    cluster_id TEXT NOT NULL,
    node_name TEXT NOT NULL,
    declared_at_ms BIGINT NOT NULL,
    PRIMARY KEY (cluster_id, node_name)
);

CREATE TABLE imports (
    cluster_id TEXT NOT NULL,
    node_name TEXT NOT NULL,
    service TEXT NOT NULL,
    PRIMARY KEY (cluster_id, node_name, service)
);
