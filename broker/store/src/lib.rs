//! The broker's store: SQLite (default, a file created on first start) or PostgreSQL (by URL),
//! through sqlx's `Any` driver and one set of portable migrations (`migrations/`).
//!
//! The store keeps clusters and their agents, egress prices, the latest measurements (RTT, RPS,
//! capacity, each with the time it was measured), policies, the published weights
//! generations (each stores the (service, source) pairs whose weights changed; the weights in
//! force at a generation are each pair's newest rows up to it) and a record of each solver
//! run.
//!
//! Layout, by subject: [`registry`](crate::Store::register) (clusters, agents, acks),
//! measurements (reports, imports, imports without a VIP), settings (prices, policies), generations (publish,
//! weights in force, retention) and runs (solver runs); rows in `records`.
//!
//! Retention: [`Store::prune_generations`] keeps the newest K generations (the weight rows
//! they read, their `generations` rows and the solver runs that produced them) and deletes
//! the older ones; the engine calls it after every publish. The newest generation is always kept, so
//! [`Store::last_generation`] (and the sequence after a restart) is unaffected. Acks are one
//! row per (cluster, node, service), bounded already, and are never pruned.

use std::path::Path;

use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

mod generations;
mod lease;
mod measurements;
mod notify;
mod records;
mod registry;
mod runs;
mod service_time;
mod settings;
#[cfg(feature = "testing")]
pub mod testing;

pub use lease::{LeaderTerm, LeaseState};
pub use notify::{GenerationListener, Notice};
pub use records::{
    AckRecord, AgentRecord, CapacityRecord, ClusterRecord, CrdPolicy, CrdPriceRecord, CrdSync,
    ImportDeclaration, PolicyOrigin, PolicyRecord, PruneStats, ReportRecord, RpsRecord, RttRecord,
    ServiceTimePoint, SolverRunRecord, StoredPolicy, WeightRecord, WithoutVipRecord,
};

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL is neither `sqlite:` nor `postgres:`/`postgresql:`.
    #[error("database url {0:?}: expected sqlite://PATH or postgres://...")]
    Url(String),
    /// A database error.
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// Applying the migrations failed.
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// An Admin API write to a policy scope that a policy CRD holds (the CRD wins).
    #[error(
        "the policy of {} is set by {object} (a policy CRD, the declared source of truth): \
         change or delete that object instead",
        if scope.is_empty() { "the cluster (cluster-wide)".to_string() } else { format!("service {scope:?}") }
    )]
    PolicyHeldByCrd { scope: String, object: String },
    /// A publish by a replica that no longer holds the leader lease under its term (another
    /// replica took over, or its lease expired): nothing was stored; stop leading.
    #[error("fenced: publish under term {term} refused, the lease is at term {current_term} (another replica leads, or this lease expired)")]
    Fenced { term: i64, current_term: i64 },
    /// A generation notification whose payload is not a generation number.
    #[error("generation notification: payload {0:?} is not a generation number")]
    Notification(String),
    /// Two CRD policies given for one scope in one sync.
    #[error("policy scope {0:?} given twice in one CRD sync")]
    DuplicateScope(String),
    /// A write that would take a cluster over one of the [`StoreLimits`]; nothing of it
    /// was stored.
    #[error("{what}: over the limit of {limit} (the broker's {flag}); nothing of it was stored")]
    Limit {
        /// What is over the limit, e.g. `cluster "c1" would have 5001 nodes`.
        what: String,
        /// The limit.
        limit: u64,
        /// The `ballast-broker serve` flag that sets it.
        flag: &'static str,
    },
}

/// Bounds on what the store keeps per cluster, checked in the writing transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreLimits {
    /// Nodes (agents) per cluster: a registration or report of a new node beyond it is
    /// refused (`--max-nodes-per-cluster`).
    pub max_nodes_per_cluster: u64,
    /// Distinct services a cluster's nodes declare they import, the union over its nodes:
    /// a declaration that would take the cluster beyond it is refused
    /// (`--max-imports-per-cluster`).
    pub max_imports_per_cluster: u64,
}

/// Default of [`StoreLimits::max_nodes_per_cluster`].
pub const DEFAULT_MAX_NODES_PER_CLUSTER: u64 = 5000;
/// Default of [`StoreLimits::max_imports_per_cluster`].
pub const DEFAULT_MAX_IMPORTS_PER_CLUSTER: u64 = 20_000;

impl Default for StoreLimits {
    fn default() -> Self {
        Self {
            max_nodes_per_cluster: DEFAULT_MAX_NODES_PER_CLUSTER,
            max_imports_per_cluster: DEFAULT_MAX_IMPORTS_PER_CLUSTER,
        }
    }
}

pub(crate) type Result<T> = std::result::Result<T, StoreError>;

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Rows of `weights` per INSERT statement in [`Store::publish`].
pub(crate) const WEIGHT_ROWS_PER_INSERT: usize = 1000;

/// The VALUES list of a multi-row INSERT of `rows` rows of `cols` placeholders, bound in
/// order: `($1, …, $cols), ($cols+1, …), …` for PostgreSQL, `(?, …), …` for SQLite, where
/// numbered (named) placeholders are looked up one by one and made a 10,000-row publish
/// several times slower than plain positional ones. (sqlx's `QueryBuilder` writes `?` for the
/// Any driver whatever the database, which PostgreSQL refuses.)
pub(crate) fn values_list(backend: Backend, rows: usize, cols: usize) -> String {
    (0..rows)
        .map(|r| {
            let cells: Vec<String> = (1..=cols)
                .map(|c| match backend {
                    Backend::Postgres => format!("${}", r * cols + c),
                    Backend::Sqlite => "?".to_string(),
                })
                .collect();
            format!("({})", cells.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rows of `rows` with a distinct `key`, the last of each key kept, in the order of
/// their first occurrence: what a multi-row upsert may insert (PostgreSQL refuses one that
/// touches a row twice: "ON CONFLICT DO UPDATE command cannot affect row a second time"),
/// with the result of upserting `rows` one by one. Borrows when every key is distinct.
pub(crate) fn last_per_key<'a, T, K, F>(rows: &'a [T], key: F) -> std::borrow::Cow<'a, [T]>
where
    T: Clone,
    K: std::hash::Hash + Eq + 'a,
    F: Fn(&'a T) -> K,
{
    let mut slot: std::collections::HashMap<K, usize> =
        std::collections::HashMap::with_capacity(rows.len());
    let mut out: Vec<&'a T> = Vec::with_capacity(rows.len());
    for r in rows {
        match slot.entry(key(r)) {
            std::collections::hash_map::Entry::Occupied(e) => out[*e.get()] = r,
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(out.len());
                out.push(r);
            }
        }
    }
    if out.len() == rows.len() {
        std::borrow::Cow::Borrowed(rows)
    } else {
        std::borrow::Cow::Owned(out.into_iter().cloned().collect())
    }
}

/// The store (cheap to clone: a connection pool).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// Leadership's own connections (PostgreSQL: a separate pool of 2, so lease renewals never
    /// queue behind a fleet's report and ack writes; SQLite: the same pool).
    lease_pool: AnyPool,
    backend: Backend,
    limits: StoreLimits,
    /// The URL connected with.
    url: String,
    /// PostgreSQL: the channel new generations are notified on ([`Store::generation_channel`]).
    channel: Option<String>,
}

/// `sqlite://PATH?mode=rwc`: the URL of a SQLite file, created when missing.
#[must_use]
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

pub(crate) fn b2i(b: bool) -> i64 {
    i64::from(b)
}

impl Store {
    /// Connects (creating a SQLite file when the URL says `mode=rwc`) and applies the migrations.
    ///
    /// # Errors
    /// A bad URL, a connection failure or a failed migration.
    pub async fn connect(url: &str) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::Url(url.to_string()));
        };
        let max = match backend {
            Backend::Sqlite => 4,
            Backend::Postgres => 8,
        };
        // A database that cannot be reached fails the start within 10 s (sqlx's default, 30 s,
        // kept `serve` silent for half a minute before naming --database).
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await?;
        if backend == Backend::Sqlite {
            // Readers do not block the writer; persistent for the file.
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        sqlx::migrate!("../../migrations").run(&pool).await?;
        let lease_pool = match backend {
            Backend::Sqlite => pool.clone(),
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(2)
                    .acquire_timeout(std::time::Duration::from_secs(10))
                    .connect(url)
                    .await?
            }
        };
        let channel = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                use sqlx::Row;
                let schema: String = sqlx::query("SELECT CAST(current_schema() AS TEXT) AS s")
                    .fetch_one(&pool)
                    .await?
                    .try_get("s")?;
                Some(lease::channel_name(&schema))
            }
        };
        Ok(Self {
            pool,
            lease_pool,
            backend,
            limits: StoreLimits::default(),
            url: url.to_owned(),
            channel,
        })
    }

    /// The same store (pool) with other limits.
    #[must_use]
    pub fn with_limits(mut self, limits: StoreLimits) -> Self {
        self.limits = limits;
        self
    }

    /// The limits writes are checked against.
    #[must_use]
    pub fn limits(&self) -> StoreLimits {
        self.limits
    }

    /// Refuses a new node of `cluster_id` beyond [`StoreLimits::max_nodes_per_cluster`]
    /// (inside the writing transaction; an existing node always passes).
    pub(crate) async fn check_node_limit(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        cluster_id: &str,
        node_name: &str,
    ) -> Result<()> {
        use sqlx::Row;
        // A write first (a no-op on a known node, nothing on a new one): on SQLite a
        // transaction that reads first and writes later fails at once (SQLITE_BUSY) when
        // another writer committed in between, where one that starts with a write waits.
        let known = sqlx::query(
            "UPDATE agents SET agent_version = agent_version \
             WHERE cluster_id = $1 AND node_name = $2",
        )
        .bind(cluster_id)
        .bind(node_name)
        .execute(&mut **tx)
        .await?
        .rows_affected();
        if known > 0 {
            return Ok(());
        }
        let nodes: i64 = sqlx::query("SELECT COUNT(*) AS n FROM agents WHERE cluster_id = $1")
            .bind(cluster_id)
            .fetch_one(&mut **tx)
            .await?
            .try_get("n")?;
        let max = self.limits.max_nodes_per_cluster;
        if u64::try_from(nodes).unwrap_or(0) >= max {
            return Err(StoreError::Limit {
                what: format!(
                    "node {node_name:?} of cluster {cluster_id:?}: the cluster has {nodes} nodes \
                     (max_nodes_per_cluster)"
                ),
                limit: max,
                flag: "--max-nodes-per-cluster",
            });
        }
        Ok(())
    }

    /// Which database this is.
    #[must_use]
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A cheap query on the store's schema (one row of `policies` at most): proves the
    /// database answers and the migrated tables are there. Callers bound it with a timeout.
    ///
    /// # Errors
    /// A database error (unreachable, closed pool, schema gone).
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT scope FROM policies LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(())
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
        self.lease_pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::{last_per_key, values_list, Backend};

    #[test]
    fn last_per_key_keeps_the_last_of_each_key_in_first_order() {
        let rows = [("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)];
        let out = last_per_key(&rows, |r| r.0);
        assert_eq!(&*out, &[("a", 3), ("b", 5), ("c", 4)]);
        let distinct = [("a", 1), ("b", 2)];
        assert!(matches!(
            last_per_key(&distinct, |r| r.0),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn values_list_numbers_every_postgres_cell_once_in_order() {
        assert_eq!(values_list(Backend::Postgres, 1, 2), "($1, $2)");
        assert_eq!(
            values_list(Backend::Postgres, 2, 3),
            "($1, $2, $3), ($4, $5, $6)"
        );
        assert_eq!(values_list(Backend::Sqlite, 2, 2), "(?, ?), (?, ?)");
        assert_eq!(values_list(Backend::Postgres, 0, 3), "");
    }
}
