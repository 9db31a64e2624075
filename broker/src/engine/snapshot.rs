//! A [`Snapshot`]: everything the engine's pure core reads from the store, read in one place
//! ([`Snapshot::read`]) so that planning, cluster status and their tests need no database.

use ballast_store::{
    AgentRecord, CapacityRecord, ClusterRecord, ImportDeclaration, PolicyRecord, RpsRecord,
    RttRecord, Store, StoreError, WithoutVipRecord,
};

/// The stored facts a round or a status report is computed from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub clusters: Vec<ClusterRecord>,
    pub agents: Vec<AgentRecord>,
    pub rtt: Vec<RttRecord>,
    pub rps: Vec<RpsRecord>,
    pub capacity: Vec<CapacityRecord>,
    pub imports: Vec<ImportDeclaration>,
    /// Imports the agents cannot steer for want of a VIP (for operators, not the solve).
    pub without_vip: Vec<WithoutVipRecord>,
    pub policies: Vec<PolicyRecord>,
    /// `(tier, usd_per_gb)` set by the operator.
    pub prices: Vec<(String, f64)>,
}

impl Snapshot {
    /// Reads every table the engine plans from.
    ///
    /// # Errors
    /// A store error.
    pub async fn read(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            clusters: store.clusters().await?,
            agents: store.agents().await?,
            rtt: store.rtt().await?,
            rps: store.rps().await?,
            capacity: store.capacity().await?,
            imports: store.imports().await?,
            without_vip: store.services_without_vip().await?,
            policies: store.policies().await?,
            prices: store.prices().await?,
        })
    }
}
