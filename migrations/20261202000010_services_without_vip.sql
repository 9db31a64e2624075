-- The ServiceImports an agent (node) cannot steer for want of a VIP (ClusterSetIP without
-- spec.ips, e.g. Submariner Lighthouse without clusterset IPs), for operators. A cluster
-- fact, replaced per node with every full-set report (ReportRequest.services_without_vip),
-- shown by `ballast-broker admin clusters`; not read by the solver.
CREATE TABLE services_without_vip (
    cluster_id TEXT NOT NULL,
    node_name TEXT NOT NULL,
    service TEXT NOT NULL,
    PRIMARY KEY (cluster_id, node_name, service)
);
