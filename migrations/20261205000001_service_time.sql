-- A cluster's declared service-time curve (base_ms + slope_ms_per_rps x load), stored with
-- the capacity sample that carried it; -1 (or NULL, for rows older than this migration):
-- none declared. Not NULL on insert: see `NO_CURVE` in broker/store/src/measurements.rs.
ALTER TABLE capacity_latest ADD COLUMN service_base_ms DOUBLE PRECISION;
ALTER TABLE capacity_latest ADD COLUMN service_slope_ms_per_rps DOUBLE PRECISION;
