-- The `default` LoadBalancingPolicy's spec.egressPrices (negotiated rates), as the policy sync
-- last applied them; replaced as a whole. Over the broker's price table and --egress-prices file.
CREATE TABLE crd_egress_prices (
    position BIGINT NOT NULL PRIMARY KEY,
    provider TEXT NOT NULL,
    from_region TEXT NOT NULL,
    to_region TEXT NOT NULL,
    usd_per_gb DOUBLE PRECISION NOT NULL,
    note TEXT NOT NULL
);
