-- Where each policy row comes from, so the policy CRD resync can make the CRD-made rows equal
-- the objects that exist without touching what an operator set through the Admin API:
-- origin 'admin' (`ballast-broker admin policy`, gRPC Admin SetPolicy) or 'crd' (a
-- LoadBalancingPolicy / ServiceLoadBalancingPolicy object, named in `source` as
-- `LoadBalancingPolicy/NAME` or `ServiceLoadBalancingPolicy/NAMESPACE/NAME`). One row per scope:
-- a CRD row replaces an admin row of the same scope, and admin writes to a CRD-held scope are
-- refused. Rows from before this migration read as 'admin' (they may have been written by an
-- older broker's CRD watcher: the first resync rewrites every CRD that still exists as 'crd').
ALTER TABLE policies ADD COLUMN origin TEXT NOT NULL DEFAULT 'admin';
ALTER TABLE policies ADD COLUMN source TEXT NOT NULL DEFAULT '';
