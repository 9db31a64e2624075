-- ballast broker store. Portable SQL: the same file runs on SQLite and PostgreSQL.
-- Times are Unix epoch milliseconds (BIGINT); booleans are BIGINT 0/1.

-- Registered clusters.
CREATE TABLE clusters (
    cluster_id TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    zone TEXT NOT NULL,
    provider TEXT NOT NULL,
    gateway_address TEXT NOT NULL,
    registered_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- The agents (nodes) of each cluster.
CREATE TABLE agents (
    cluster_id TEXT NOT NULL,
    node_name TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    registered_at_ms BIGINT NOT NULL,
    last_report_ms BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (cluster_id, node_name)
);

-- Egress price per tier (same_zone, cross_zone, cross_region, internet), USD per GB.
CREATE TABLE prices (
    tier TEXT PRIMARY KEY,
    usd_per_gb DOUBLE PRECISION NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- Latest RTT per (source cluster, destination cluster, reporting node).
CREATE TABLE rtt_latest (
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    node_name TEXT NOT NULL,
    rtt_ms DOUBLE PRECISION NOT NULL,
    loss_ratio DOUBLE PRECISION NOT NULL,
    reachable BIGINT NOT NULL,
    measured_at_ms BIGINT NOT NULL,
    PRIMARY KEY (src, dst, node_name)
);

-- Latest RPS per (source cluster, service, destination cluster, reporting node).
CREATE TABLE rps_latest (
    src TEXT NOT NULL,
    service TEXT NOT NULL,
    dst TEXT NOT NULL,
    node_name TEXT NOT NULL,
    rps DOUBLE PRECISION NOT NULL,
    measured_at_ms BIGINT NOT NULL,
    PRIMARY KEY (src, service, dst, node_name)
);

-- Latest capacity per (serving cluster, service, reporting node).
CREATE TABLE capacity_latest (
    cluster_id TEXT NOT NULL,
    service TEXT NOT NULL,
    node_name TEXT NOT NULL,
    capacity_rps DOUBLE PRECISION NOT NULL,
    measured_at_ms BIGINT NOT NULL,
    PRIMARY KEY (cluster_id, service, node_name)
);

-- Policies: scope '' is the cluster-wide policy, any other scope is a service override.
CREATE TABLE policies (
    scope TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    params TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);

-- Every published weights generation: a full snapshot of the weights of every
-- (service, source) at that generation.
CREATE TABLE weights (
    generation BIGINT NOT NULL,
    service TEXT NOT NULL,
    src TEXT NOT NULL,
    dst TEXT NOT NULL,
    weight DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    reason TEXT NOT NULL,
    policy TEXT NOT NULL,
    params TEXT NOT NULL,
    computed_at_ms BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (generation, service, src, dst)
);
CREATE INDEX weights_generation ON weights (generation);

-- One row per solver run.
CREATE TABLE solver_runs (
    id BIGINT PRIMARY KEY,
    started_at_ms BIGINT NOT NULL,
    inputs_digest TEXT NOT NULL,
    status TEXT NOT NULL,
    objective DOUBLE PRECISION NOT NULL,
    duration_ms DOUBLE PRECISION NOT NULL,
    services BIGINT NOT NULL,
    generation BIGINT NOT NULL,
    detail TEXT NOT NULL
);

-- The latest acknowledgement per (cluster, node, service).
CREATE TABLE acks (
    cluster_id TEXT NOT NULL,
    node_name TEXT NOT NULL,
    service TEXT NOT NULL,
    generation BIGINT NOT NULL,
    applied BIGINT NOT NULL,
    error TEXT NOT NULL,
    acked_at_ms BIGINT NOT NULL,
    PRIMARY KEY (cluster_id, node_name, service)
);
