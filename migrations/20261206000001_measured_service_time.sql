-- The service time a node measured on its cluster's endpoints (probe time to first byte), stored
-- with its capacity sample; -1 (or NULL, for rows older than this migration): no probe.
ALTER TABLE capacity_latest ADD COLUMN measured_service_ms DOUBLE PRECISION;

-- Points (load on the cluster, measured service time) the leader records per (service,
-- cluster), one per newest-sample time; every replica fits the curve from the recent ones.
CREATE TABLE service_time_points (
    service TEXT NOT NULL,
    cluster_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    load_rps DOUBLE PRECISION NOT NULL,
    service_ms DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (service, cluster_id, at_ms)
);
CREATE INDEX service_time_points_at ON service_time_points (at_ms);
