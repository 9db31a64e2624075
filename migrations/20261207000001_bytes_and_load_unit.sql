-- Issue 12: payload bytes per second each way with every RPS sample (the agent's BPF byte
-- counters), and the load unit a capacity is stated in ('connections' | 'requests' | 'bytes').
ALTER TABLE rps_latest ADD COLUMN bytes_sent_per_s DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE rps_latest ADD COLUMN bytes_received_per_s DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE capacity_latest ADD COLUMN load_unit TEXT NOT NULL DEFAULT 'connections';
