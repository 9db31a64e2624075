//! A [`Snapshot`]: everything the engine's pure core reads from the store, read in one place
//! ([`Snapshot::read`]) so that planning, cluster status and their tests need no database.

use std::collections::BTreeMap;

use ballast_store::{
    AgentRecord, CapacityRecord, ClusterRecord, CrdPriceRecord, ImportDeclaration, PolicyRecord,
    RpsRecord, RttRecord, ServiceTimePoint, Store, StoreError, WithoutVipRecord,
};

/// The stored facts a round or a status report is computed from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub clusters: Vec<ClusterRecord>,
    pub agents: Vec<AgentRecord>,
    pub rtt: Vec<RttRecord>,
    pub rps: Vec<RpsRecord>,
    pub capacity: Vec<CapacityRecord>,
    /// Import declarations; read from the store already aggregated, one per cluster
    /// ([`Store::cluster_imports`]), so their size does not grow with nodes x services.
    pub imports: Vec<ImportDeclaration>,
    /// Distinct imports per declaring cluster when read counts-only
    /// ([`Snapshot::read_for_status`] without the names; then `imports` has no services).
    pub import_counts: BTreeMap<String, u64>,
    /// Imports the agents cannot steer for want of a VIP (for operators, not the solve).
    pub without_vip: Vec<WithoutVipRecord>,
    pub policies: Vec<PolicyRecord>,
    /// `(tier, usd_per_gb)` set by the operator.
    pub prices: Vec<(String, f64)>,
    /// Recent (load, measured service time) points per (service, cluster), for the fit
    /// (read since [`super::fit::WINDOW`] before now; empty for status).
    pub service_time_points: Vec<ServiceTimePoint>,
    /// The policy CRD's egress price rows (empty for status).
    pub crd_prices: Vec<CrdPriceRecord>,
}

impl Snapshot {
    /// Reads every table the engine plans from; imports aggregated per cluster as of the
    /// freshness cut `imports_cut_ms` (now minus the stale-after age).
    ///
    /// # Errors
    /// A store error.
    pub async fn read(store: &Store, imports_cut_ms: i64) -> Result<Self, StoreError> {
        Ok(Self {
            clusters: store.clusters().await?,
            agents: store.agents().await?,
            rtt: store.rtt().await?,
            rps: store.rps().await?,
            capacity: store.capacity().await?,
            imports: store.cluster_imports(imports_cut_ms).await?,
            import_counts: BTreeMap::new(),
            without_vip: store.services_without_vip().await?,
            policies: store.policies().await?,
            prices: store.prices().await?,
            service_time_points: store
                .service_time_points(imports_cut_ms.saturating_sub(super::fit::window_ms()))
                .await?,
            crd_prices: store.crd_prices().await?,
        })
    }

    /// [`Snapshot::read`] for cluster status: with `import_names` false, imports are counted
    /// in the database ([`Snapshot::import_counts`]) instead of read.
    ///
    /// # Errors
    /// A store error.
    pub async fn read_for_status(
        store: &Store,
        imports_cut_ms: i64,
        import_names: bool,
    ) -> Result<Self, StoreError> {
        if import_names {
            return Self::read(store, imports_cut_ms).await;
        }
        Ok(Self {
            clusters: store.clusters().await?,
            agents: store.agents().await?,
            rtt: store.rtt().await?,
            rps: store.rps().await?,
            capacity: store.capacity().await?,
            imports: store.cluster_import_heads().await?,
            import_counts: store.cluster_import_counts(imports_cut_ms).await?,
            without_vip: store.services_without_vip().await?,
            policies: Vec::new(),
            prices: Vec::new(),
            service_time_points: Vec::new(),
            crd_prices: Vec::new(),
        })
    }
}
