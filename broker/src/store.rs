//! The broker's store: SQLite (default, a file created on first start) or PostgreSQL (by URL),
//! through sqlx's `Any` driver and one set of portable migrations (`migrations/`).
//!
//! The store keeps clusters and their agents, egress prices, the latest measurements (RTT, RPS,
//! capacity, each with the time it was measured), policies, the published weights
//! generations (each stores the (service, source) pairs whose weights changed; the weights in
//! force at a generation are each pair's newest rows up to it) and a record of each solver
//! run.
//!
//! Retention: [`Store::prune_generations`] keeps the newest K generations (the weight rows
//! they read, their `generations` rows and the solver runs that produced them) and deletes
//! the older ones; the engine calls it after every publish. The newest generation is always kept, so
//! [`Store::last_generation`] (and the sequence after a restart) is unaffected. Acks are one
//! row per (cluster, node, service), bounded already, and are never pruned.

use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU64;
use std::path::Path;

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Row};

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
}

type Result<T> = std::result::Result<T, StoreError>;

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A registered cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterRecord {
    pub cluster_id: String,
    pub region: String,
    pub zone: String,
    pub provider: String,
    pub gateway_address: String,
    pub registered_at_ms: i64,
    pub updated_at_ms: i64,
}

/// One agent (node) of a cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentRecord {
    pub cluster_id: String,
    pub node_name: String,
    pub agent_version: String,
    pub registered_at_ms: i64,
    /// When its last report was received (0 = never).
    pub last_report_ms: i64,
    /// The highest generation it acknowledged as applied (0 = none).
    pub acked_generation: i64,
}

/// Latest RTT from `src` to `dst` as measured by one node of `src`.
#[derive(Debug, Clone, PartialEq)]
pub struct RttRecord {
    pub src: String,
    pub dst: String,
    pub node_name: String,
    pub rtt_ms: f64,
    pub loss_ratio: f64,
    pub reachable: bool,
    pub measured_at_ms: i64,
}

/// Latest RPS sent by one node of `src` for `service` to `dst`.
#[derive(Debug, Clone, PartialEq)]
pub struct RpsRecord {
    pub src: String,
    pub service: String,
    pub dst: String,
    pub node_name: String,
    pub rps: f64,
    pub measured_at_ms: i64,
}

/// Latest capacity of one node's share of `service` in `cluster_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityRecord {
    pub cluster_id: String,
    pub service: String,
    pub node_name: String,
    pub capacity_rps: f64,
    pub measured_at_ms: i64,
}

/// One validated report of one agent, stored atomically.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ReportRecord {
    pub cluster_id: String,
    pub node_name: String,
    pub received_at_ms: i64,
    pub rtt: Vec<RttRecord>,
    pub rps: Vec<RpsRecord>,
    pub capacity: Vec<CapacityRecord>,
    /// The node's full list of imported services, when the report says it (`None`: not
    /// said; the previous declaration, if any, stays).
    pub imports: Option<Vec<String>>,
}

/// What one node last said its cluster imports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportDeclaration {
    pub cluster_id: String,
    pub node_name: String,
    /// When the node said it.
    pub declared_at_ms: i64,
    /// When the node was last heard from (its declaration or a later report without one:
    /// agents send their imports only when they change).
    pub heard_at_ms: i64,
    pub services: BTreeSet<String>,
}

/// A policy row: `scope` is `""` for the cluster-wide policy or a service name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRecord {
    pub scope: String,
    pub policy: String,
    pub params: String,
}

/// One weight of one published generation.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightRecord {
    pub service: String,
    pub src: String,
    pub dst: String,
    pub weight: f64,
    pub status: String,
    pub reason: String,
    pub policy: String,
    pub params: String,
    pub computed_at_ms: i64,
}

/// One solver run.
#[derive(Debug, Clone, PartialEq)]
pub struct SolverRunRecord {
    pub id: i64,
    pub started_at_ms: i64,
    pub inputs_digest: String,
    pub status: String,
    pub objective: f64,
    pub duration_ms: f64,
    pub services: i64,
    pub generation: i64,
    pub detail: String,
}

/// One acknowledgement from an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct AckRecord {
    pub cluster_id: String,
    pub node_name: String,
    pub service: String,
    pub generation: i64,
    pub applied: bool,
    pub error: String,
    pub acked_at_ms: i64,
}

/// Rows of `weights` per INSERT statement in [`Store::publish`].
const WEIGHT_ROWS_PER_INSERT: usize = 1000;

/// The VALUES list of a multi-row INSERT of `rows` rows of `cols` placeholders, bound in
/// order: `($1, …, $cols), ($cols+1, …), …` for PostgreSQL, `(?, …), …` for SQLite, where
/// numbered (named) placeholders are looked up one by one and made a 10,000-row publish
/// several times slower than plain positional ones. (sqlx's `QueryBuilder` writes `?` for the
/// Any driver whatever the database, which PostgreSQL refuses.)
fn values_list(backend: Backend, rows: usize, cols: usize) -> String {
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

/// What one [`Store::prune_generations`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PruneStats {
    /// The newest generation deleted (0 = nothing was deleted).
    pub up_to_generation: i64,
    /// `generations` rows deleted.
    pub generations: u64,
    /// `weights` rows deleted.
    pub weights: u64,
    /// `solver_runs` rows deleted.
    pub solver_runs: u64,
}

/// The store (cheap to clone: a connection pool).
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// `sqlite://PATH?mode=rwc`: the URL of a SQLite file, created when missing.
#[must_use]
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

fn b2i(b: bool) -> i64 {
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
        let pool = AnyPoolOptions::new()
            .max_connections(max)
            .connect(url)
            .await?;
        if backend == Backend::Sqlite {
            // Readers do not block the writer; persistent for the file.
            sqlx::query("PRAGMA journal_mode=WAL")
                .execute(&pool)
                .await?;
        }
        sqlx::migrate!("../migrations").run(&pool).await?;
        Ok(Self { pool, backend })
    }

    /// Which database this is.
    #[must_use]
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Inserts or updates a cluster and one of its agents, atomically.
    ///
    /// # Errors
    /// A database error.
    pub async fn register(&self, cluster: &ClusterRecord, agent: &AgentRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO clusters (cluster_id, region, zone, provider, gateway_address, \
             registered_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (cluster_id) DO UPDATE SET region = excluded.region, \
             zone = excluded.zone, provider = excluded.provider, \
             gateway_address = excluded.gateway_address, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(&cluster.cluster_id)
        .bind(&cluster.region)
        .bind(&cluster.zone)
        .bind(&cluster.provider)
        .bind(&cluster.gateway_address)
        .bind(cluster.registered_at_ms)
        .bind(cluster.updated_at_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO agents (cluster_id, node_name, agent_version, registered_at_ms, \
             last_report_ms) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (cluster_id, node_name) DO UPDATE SET \
             agent_version = excluded.agent_version",
        )
        .bind(&agent.cluster_id)
        .bind(&agent.node_name)
        .bind(&agent.agent_version)
        .bind(agent.registered_at_ms)
        .bind(agent.last_report_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every cluster, sorted by id.
    ///
    /// # Errors
    /// A database error.
    pub async fn clusters(&self) -> Result<Vec<ClusterRecord>> {
        let rows = sqlx::query(
            "SELECT cluster_id, region, zone, provider, gateway_address, registered_at_ms, \
             updated_at_ms FROM clusters ORDER BY cluster_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ClusterRecord {
                    cluster_id: r.try_get("cluster_id")?,
                    region: r.try_get("region")?,
                    zone: r.try_get("zone")?,
                    provider: r.try_get("provider")?,
                    gateway_address: r.try_get("gateway_address")?,
                    registered_at_ms: r.try_get("registered_at_ms")?,
                    updated_at_ms: r.try_get("updated_at_ms")?,
                })
            })
            .collect()
    }

    /// Whether a cluster is registered.
    ///
    /// # Errors
    /// A database error.
    pub async fn cluster_exists(&self, cluster_id: &str) -> Result<bool> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM clusters WHERE cluster_id = $1")
            .bind(cluster_id)
            .fetch_one(&self.pool)
            .await?;
        let n: i64 = row.try_get("n")?;
        Ok(n > 0)
    }

    /// Every agent, sorted by cluster then node, with the generation each acknowledged.
    ///
    /// # Errors
    /// A database error.
    pub async fn agents(&self) -> Result<Vec<AgentRecord>> {
        let rows = sqlx::query(
            "SELECT a.cluster_id, a.node_name, a.agent_version, a.registered_at_ms, \
             a.last_report_ms, \
             (SELECT MAX(k.generation) FROM acks k WHERE k.cluster_id = a.cluster_id \
              AND k.node_name = a.node_name AND k.applied = 1) AS acked \
             FROM agents a ORDER BY a.cluster_id, a.node_name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AgentRecord {
                    cluster_id: r.try_get("cluster_id")?,
                    node_name: r.try_get("node_name")?,
                    agent_version: r.try_get("agent_version")?,
                    registered_at_ms: r.try_get("registered_at_ms")?,
                    last_report_ms: r.try_get("last_report_ms")?,
                    acked_generation: r.try_get::<Option<i64>, _>("acked")?.unwrap_or(0),
                })
            })
            .collect()
    }

    /// Stores one report atomically: every sample replaces the previous one of its key.
    ///
    /// # Errors
    /// A database error (then nothing of the report is stored).
    pub async fn store_report(&self, report: &ReportRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for s in &report.rtt {
            sqlx::query(
                "INSERT INTO rtt_latest (src, dst, node_name, rtt_ms, loss_ratio, reachable, \
                 measured_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (src, dst, node_name) DO UPDATE SET rtt_ms = excluded.rtt_ms, \
                 loss_ratio = excluded.loss_ratio, reachable = excluded.reachable, \
                 measured_at_ms = excluded.measured_at_ms",
            )
            .bind(&s.src)
            .bind(&s.dst)
            .bind(&s.node_name)
            .bind(s.rtt_ms)
            .bind(s.loss_ratio)
            .bind(b2i(s.reachable))
            .bind(s.measured_at_ms)
            .execute(&mut *tx)
            .await?;
        }
        for s in &report.rps {
            sqlx::query(
                "INSERT INTO rps_latest (src, service, dst, node_name, rps, measured_at_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (src, service, dst, node_name) DO UPDATE SET rps = excluded.rps, \
                 measured_at_ms = excluded.measured_at_ms",
            )
            .bind(&s.src)
            .bind(&s.service)
            .bind(&s.dst)
            .bind(&s.node_name)
            .bind(s.rps)
            .bind(s.measured_at_ms)
            .execute(&mut *tx)
            .await?;
        }
        for s in &report.capacity {
            sqlx::query(
                "INSERT INTO capacity_latest (cluster_id, service, node_name, capacity_rps, \
                 measured_at_ms) VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (cluster_id, service, node_name) DO UPDATE SET \
                 capacity_rps = excluded.capacity_rps, measured_at_ms = excluded.measured_at_ms",
            )
            .bind(&s.cluster_id)
            .bind(&s.service)
            .bind(&s.node_name)
            .bind(s.capacity_rps)
            .bind(s.measured_at_ms)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(services) = &report.imports {
            self.replace_imports(&mut tx, report, services).await?;
        }
        sqlx::query(
            "INSERT INTO agents (cluster_id, node_name, agent_version, registered_at_ms, \
             last_report_ms) VALUES ($1, $2, '', $3, $3) ON CONFLICT (cluster_id, node_name) \
             DO UPDATE SET last_report_ms = excluded.last_report_ms",
        )
        .bind(&report.cluster_id)
        .bind(&report.node_name)
        .bind(report.received_at_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Replaces one node's import declaration (inside the report's transaction).
    async fn replace_imports(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        report: &ReportRecord,
        services: &[String],
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO import_declarations (cluster_id, node_name, declared_at_ms) \
             VALUES ($1, $2, $3) ON CONFLICT (cluster_id, node_name) \
             DO UPDATE SET declared_at_ms = excluded.declared_at_ms",
        )
        .bind(&report.cluster_id)
        .bind(&report.node_name)
        .bind(report.received_at_ms)
        .execute(&mut **tx)
        .await?;
        sqlx::query("DELETE FROM imports WHERE cluster_id = $1 AND node_name = $2")
            .bind(&report.cluster_id)
            .bind(&report.node_name)
            .execute(&mut **tx)
            .await?;
        for chunk in services.chunks(WEIGHT_ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO imports (cluster_id, node_name, service) VALUES {}",
                values_list(self.backend, chunk.len(), 3)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for service in chunk {
                q = q
                    .bind(&report.cluster_id)
                    .bind(&report.node_name)
                    .bind(service);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Deletes the import declarations of nodes not heard from (declaration or report) since
    /// `cut_ms`. Returns how many nodes' declarations were deleted.
    ///
    /// # Errors
    /// A database error (then nothing is deleted).
    pub async fn prune_import_declarations(&self, cut_ms: i64) -> Result<u64> {
        let gone: Vec<(String, String)> = self
            .imports()
            .await?
            .into_iter()
            .filter(|d| d.heard_at_ms < cut_ms)
            .map(|d| (d.cluster_id, d.node_name))
            .collect();
        if gone.is_empty() {
            return Ok(0);
        }
        let mut tx = self.pool.begin().await?;
        for (cluster_id, node_name) in &gone {
            for table in ["imports", "import_declarations"] {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE cluster_id = $1 AND node_name = $2"
                )))
                .bind(cluster_id)
                .bind(node_name)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(gone.len() as u64)
    }

    /// Every node's import declaration (nodes that never declared have none).
    ///
    /// # Errors
    /// A database error.
    pub async fn imports(&self) -> Result<Vec<ImportDeclaration>> {
        let decls = sqlx::query(
            "SELECT d.cluster_id, d.node_name, d.declared_at_ms, \
             COALESCE(a.last_report_ms, d.declared_at_ms) AS last_report_ms \
             FROM import_declarations d LEFT JOIN agents a \
             ON a.cluster_id = d.cluster_id AND a.node_name = d.node_name \
             ORDER BY d.cluster_id, d.node_name",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out: BTreeMap<(String, String), ImportDeclaration> = BTreeMap::new();
        for r in &decls {
            let (cluster_id, node_name): (String, String) =
                (r.try_get("cluster_id")?, r.try_get("node_name")?);
            let declared_at_ms: i64 = r.try_get("declared_at_ms")?;
            let last_report_ms: i64 = r.try_get("last_report_ms")?;
            out.insert(
                (cluster_id.clone(), node_name.clone()),
                ImportDeclaration {
                    cluster_id,
                    node_name,
                    declared_at_ms,
                    heard_at_ms: declared_at_ms.max(last_report_ms),
                    services: BTreeSet::new(),
                },
            );
        }
        let rows = sqlx::query("SELECT cluster_id, node_name, service FROM imports")
            .fetch_all(&self.pool)
            .await?;
        for r in &rows {
            let key: (String, String) = (r.try_get("cluster_id")?, r.try_get("node_name")?);
            if let Some(d) = out.get_mut(&key) {
                d.services.insert(r.try_get("service")?);
            }
        }
        Ok(out.into_values().collect())
    }

    /// Every stored RTT sample.
    ///
    /// # Errors
    /// A database error.
    pub async fn rtt(&self) -> Result<Vec<RttRecord>> {
        let rows = sqlx::query(
            "SELECT src, dst, node_name, rtt_ms, loss_ratio, reachable, measured_at_ms \
             FROM rtt_latest ORDER BY src, dst, node_name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r: &AnyRow| {
                Ok(RttRecord {
                    src: r.try_get("src")?,
                    dst: r.try_get("dst")?,
                    node_name: r.try_get("node_name")?,
                    rtt_ms: r.try_get("rtt_ms")?,
                    loss_ratio: r.try_get("loss_ratio")?,
                    reachable: r.try_get::<i64, _>("reachable")? != 0,
                    measured_at_ms: r.try_get("measured_at_ms")?,
                })
            })
            .collect()
    }

    /// Every stored RPS sample.
    ///
    /// # Errors
    /// A database error.
    pub async fn rps(&self) -> Result<Vec<RpsRecord>> {
        let rows = sqlx::query(
            "SELECT src, service, dst, node_name, rps, measured_at_ms FROM rps_latest \
             ORDER BY src, service, dst, node_name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(RpsRecord {
                    src: r.try_get("src")?,
                    service: r.try_get("service")?,
                    dst: r.try_get("dst")?,
                    node_name: r.try_get("node_name")?,
                    rps: r.try_get("rps")?,
                    measured_at_ms: r.try_get("measured_at_ms")?,
                })
            })
            .collect()
    }

    /// Every stored capacity sample.
    ///
    /// # Errors
    /// A database error.
    pub async fn capacity(&self) -> Result<Vec<CapacityRecord>> {
        let rows = sqlx::query(
            "SELECT cluster_id, service, node_name, capacity_rps, measured_at_ms \
             FROM capacity_latest ORDER BY cluster_id, service, node_name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CapacityRecord {
                    cluster_id: r.try_get("cluster_id")?,
                    service: r.try_get("service")?,
                    node_name: r.try_get("node_name")?,
                    capacity_rps: r.try_get("capacity_rps")?,
                    measured_at_ms: r.try_get("measured_at_ms")?,
                })
            })
            .collect()
    }

    /// Sets the price of one tier.
    ///
    /// # Errors
    /// A database error.
    pub async fn set_price(&self, tier: &str, usd_per_gb: f64, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO prices (tier, usd_per_gb, updated_at_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (tier) DO UPDATE SET usd_per_gb = excluded.usd_per_gb, \
             updated_at_ms = excluded.updated_at_ms",
        )
        .bind(tier)
        .bind(usd_per_gb)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every stored price, `(tier, usd_per_gb)`, sorted by tier.
    ///
    /// # Errors
    /// A database error.
    pub async fn prices(&self) -> Result<Vec<(String, f64)>> {
        let rows = sqlx::query("SELECT tier, usd_per_gb FROM prices ORDER BY tier")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("tier")?, r.try_get("usd_per_gb")?)))
            .collect()
    }

    /// Sets (inserts or replaces) a policy.
    ///
    /// # Errors
    /// A database error.
    pub async fn set_policy(&self, p: &PolicyRecord, now_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO policies (scope, policy, params, updated_at_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (scope) DO UPDATE SET policy = excluded.policy, \
             params = excluded.params, updated_at_ms = excluded.updated_at_ms",
        )
        .bind(&p.scope)
        .bind(&p.policy)
        .bind(&p.params)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes a policy; returns whether one was there.
    ///
    /// # Errors
    /// A database error.
    pub async fn delete_policy(&self, scope: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM policies WHERE scope = $1")
            .bind(scope)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Every policy, sorted by scope (the cluster-wide one, scope `""`, first).
    ///
    /// # Errors
    /// A database error.
    pub async fn policies(&self) -> Result<Vec<PolicyRecord>> {
        let rows = sqlx::query("SELECT scope, policy, params FROM policies ORDER BY scope")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                Ok(PolicyRecord {
                    scope: r.try_get("scope")?,
                    policy: r.try_get("policy")?,
                    params: r.try_get("params")?,
                })
            })
            .collect()
    }

    /// Stores a published generation and its solver run, atomically. A generation stores
    /// what changed: `weights` holds every row of each (service, source) whose weights are
    /// new or changed (they replace that pair's rows), `removed` the pairs that no longer
    /// have weights; every other pair keeps its rows from an earlier generation
    /// ([`Store::weights_of`] reads the newest rows of each pair). Stored row by row as whole
    /// snapshots, a generation cost services × sources × destinations rows however little
    /// moved.
    ///
    /// # Errors
    /// A database error (then nothing is stored), e.g. a generation that already exists.
    pub async fn publish(
        &self,
        generation: i64,
        created_at_ms: i64,
        weights: &[WeightRecord],
        removed: &[(String, String)],
        run: &SolverRunRecord,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO generations (generation, created_at_ms, solver_run_id) \
             VALUES ($1, $2, $3)",
        )
        .bind(generation)
        .bind(created_at_ms)
        .bind(run.id)
        .execute(&mut *tx)
        .await?;
        // Multi-row INSERTs: one statement per WEIGHT_ROWS_PER_INSERT rows (11 parameters
        // each, under SQLite's 32,766 and PostgreSQL's 65,535 bind limits). Row by row,
        // 20,000 rows took ~130 ms on SQLite.
        for chunk in weights.chunks(WEIGHT_ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO weights (generation, service, src, dst, weight, status, reason, \
                 policy, params, computed_at_ms, created_at_ms) VALUES {}",
                values_list(self.backend, chunk.len(), 11)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for w in chunk {
                q = q
                    .bind(generation)
                    .bind(&w.service)
                    .bind(&w.src)
                    .bind(&w.dst)
                    .bind(w.weight)
                    .bind(&w.status)
                    .bind(&w.reason)
                    .bind(&w.policy)
                    .bind(&w.params)
                    .bind(w.computed_at_ms)
                    .bind(created_at_ms);
            }
            q.execute(&mut *tx).await?;
        }
        for (service, src) in removed {
            // A tombstone: destination "" (never a cluster id), read as "no weights".
            sqlx::query(
                "INSERT INTO weights (generation, service, src, dst, weight, status, reason, \
                 policy, params, computed_at_ms, created_at_ms) \
                 VALUES ($1, $2, $3, '', 0, 'removed', '', '', '', $4, $4)",
            )
            .bind(generation)
            .bind(service)
            .bind(src)
            .bind(created_at_ms)
            .execute(&mut *tx)
            .await?;
        }
        insert_run(&mut tx, run).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Records a solver run that published nothing new.
    ///
    /// # Errors
    /// A database error.
    pub async fn record_run(&self, run: &SolverRunRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_run(&mut tx, run).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Keeps the newest `keep` solver runs and deletes the older ones. Rounds whose inputs
    /// changed but whose weights did not publish nothing, so their runs all carry the current
    /// generation and [`Store::prune_generations`] (which follows generations) would never
    /// reach them; the engine calls this after such a round. The newest run is never deleted,
    /// so [`Store::last_run_id`] is unchanged. Returns the number of runs deleted.
    ///
    /// # Errors
    /// A database error (then nothing is deleted).
    pub async fn prune_solver_runs(&self, keep: NonZeroU64) -> Result<u64> {
        let keep = i64::try_from(keep.get()).unwrap_or(i64::MAX);
        let mut tx = self.pool.begin().await?;
        let n = delete_runs_beyond(&mut tx, keep).await?;
        tx.commit().await?;
        Ok(n)
    }

    /// The highest generation stored (0 = none).
    ///
    /// # Errors
    /// A database error.
    pub async fn last_generation(&self) -> Result<i64> {
        let row = sqlx::query("SELECT MAX(generation) AS g FROM generations")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>("g")?.unwrap_or(0))
    }

    /// Every stored generation number, ascending (after pruning: the newest K).
    ///
    /// # Errors
    /// A database error.
    pub async fn generations(&self) -> Result<Vec<i64>> {
        let rows = sqlx::query("SELECT generation FROM generations ORDER BY generation")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("generation")?)).collect()
    }

    /// Keeps the newest `keep` generations and deletes everything older, in one transaction:
    /// the `generations` rows up to the newest deleted one (the cut); the `weights` rows up to
    /// the cut that no kept generation reads (a pair's rows superseded by a newer row of that
    /// pair at or before the cut or at the oldest kept generation, and removal tombstones: a
    /// pair unchanged since long before the cut keeps its rows); and the solver runs whose generation is up to the cut
    /// (including runs from before the first publish, generation 0), and beyond the newest
    /// `keep` runs. With `keep` or fewer generations stored, deletes nothing. The newest generation is never deleted (`keep` >= 1), so
    /// [`Store::last_generation`] and [`Store::last_run_id`] are unchanged.
    ///
    /// # Errors
    /// A database error (then nothing is deleted).
    pub async fn prune_generations(&self, keep: NonZeroU64) -> Result<PruneStats> {
        let keep = i64::try_from(keep.get()).unwrap_or(i64::MAX);
        let mut tx = self.pool.begin().await?;
        // The newest generation to delete: the (keep + 1)-th newest, if there is one.
        let cut: Option<i64> = sqlx::query(
            "SELECT generation FROM generations ORDER BY generation DESC LIMIT 1 OFFSET $1",
        )
        .bind(keep)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.try_get("generation"))
        .transpose()?;
        let Some(cut) = cut else {
            return Ok(PruneStats::default());
        };
        let mut stats = PruneStats {
            up_to_generation: cut,
            ..PruneStats::default()
        };
        // Rows no kept generation reads: a pair's rows superseded at or before the cut ...
        stats.weights = sqlx::query(
            "DELETE FROM weights WHERE generation <= $1 AND generation < \
             (SELECT MAX(x.generation) FROM weights x WHERE x.service = weights.service \
              AND x.src = weights.src AND x.generation <= $1)",
        )
        .bind(cut)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // ... and the pair's newest rows at or before the cut when the oldest kept generation
        // rewrote the pair (no kept generation reads them) ...
        stats.weights += sqlx::query(
            "DELETE FROM weights WHERE generation <= $1 AND EXISTS \
             (SELECT 1 FROM weights x WHERE x.service = weights.service \
              AND x.src = weights.src AND x.generation > $1 AND x.generation <= \
              (SELECT MIN(g.generation) FROM generations g WHERE g.generation > $1))",
        )
        .bind(cut)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        // ... and removal tombstones (nothing older of their pair is left).
        stats.weights += sqlx::query("DELETE FROM weights WHERE generation <= $1 AND dst = ''")
            .bind(cut)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        stats.solver_runs = sqlx::query("DELETE FROM solver_runs WHERE generation <= $1")
            .bind(cut)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        stats.solver_runs += delete_runs_beyond(&mut tx, keep).await?;
        stats.generations = sqlx::query("DELETE FROM generations WHERE generation <= $1")
            .bind(cut)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(stats)
    }

    /// The weights in force at one generation, sorted by service, source, destination: for
    /// each (service, source), its rows of the newest generation up to `generation` that
    /// wrote it, unless that was a removal. Empty for a generation that is not stored
    /// (never published, or pruned).
    ///
    /// # Errors
    /// A database error.
    pub async fn weights_of(&self, generation: i64) -> Result<Vec<WeightRecord>> {
        let rows = sqlx::query(
            "SELECT service, src, dst, weight, status, reason, policy, params, computed_at_ms \
             FROM weights w WHERE w.dst <> '' \
             AND EXISTS (SELECT 1 FROM generations g WHERE g.generation = $1) \
             AND w.generation = (SELECT MAX(x.generation) FROM weights x \
                 WHERE x.service = w.service AND x.src = w.src AND x.generation <= $1) \
             ORDER BY service, src, dst",
        )
        .bind(generation)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(WeightRecord {
                    service: r.try_get("service")?,
                    src: r.try_get("src")?,
                    dst: r.try_get("dst")?,
                    weight: r.try_get("weight")?,
                    status: r.try_get("status")?,
                    reason: r.try_get("reason")?,
                    policy: r.try_get("policy")?,
                    params: r.try_get("params")?,
                    computed_at_ms: r.try_get("computed_at_ms")?,
                })
            })
            .collect()
    }

    /// Rows in the `weights` table (all generations, tombstones included).
    ///
    /// # Errors
    /// A database error.
    pub async fn weight_rows(&self) -> Result<i64> {
        let row = sqlx::query("SELECT COUNT(*) AS n FROM weights")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("n")?)
    }

    /// The highest solver-run id (0 = none).
    ///
    /// # Errors
    /// A database error.
    pub async fn last_run_id(&self) -> Result<i64> {
        let row = sqlx::query("SELECT MAX(id) AS i FROM solver_runs")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>("i")?.unwrap_or(0))
    }

    /// The most recent solver runs, newest first.
    ///
    /// # Errors
    /// A database error.
    pub async fn solver_runs(&self, limit: i64) -> Result<Vec<SolverRunRecord>> {
        let rows = sqlx::query(
            "SELECT id, started_at_ms, inputs_digest, status, objective, duration_ms, services, \
             generation, detail FROM solver_runs ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(SolverRunRecord {
                    id: r.try_get("id")?,
                    started_at_ms: r.try_get("started_at_ms")?,
                    inputs_digest: r.try_get("inputs_digest")?,
                    status: r.try_get("status")?,
                    objective: r.try_get("objective")?,
                    duration_ms: r.try_get("duration_ms")?,
                    services: r.try_get("services")?,
                    generation: r.try_get("generation")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    /// Stores an acknowledgement (replacing the previous one of its key).
    ///
    /// # Errors
    /// A database error.
    pub async fn ack(&self, a: &AckRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO acks (cluster_id, node_name, service, generation, applied, error, \
             acked_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (cluster_id, node_name, service) DO UPDATE SET \
             generation = excluded.generation, applied = excluded.applied, \
             error = excluded.error, acked_at_ms = excluded.acked_at_ms",
        )
        .bind(&a.cluster_id)
        .bind(&a.node_name)
        .bind(&a.service)
        .bind(a.generation)
        .bind(b2i(a.applied))
        .bind(&a.error)
        .bind(a.acked_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}

/// Deletes every solver run older than the newest `keep` (by id); the count deleted.
async fn delete_runs_beyond(tx: &mut sqlx::Transaction<'_, sqlx::Any>, keep: i64) -> Result<u64> {
    let cut: Option<i64> =
        sqlx::query("SELECT id FROM solver_runs ORDER BY id DESC LIMIT 1 OFFSET $1")
            .bind(keep)
            .fetch_optional(&mut **tx)
            .await?
            .map(|r| r.try_get("id"))
            .transpose()?;
    let Some(cut) = cut else {
        return Ok(0);
    };
    Ok(sqlx::query("DELETE FROM solver_runs WHERE id <= $1")
        .bind(cut)
        .execute(&mut **tx)
        .await?
        .rows_affected())
}

async fn insert_run(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    run: &SolverRunRecord,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO solver_runs (id, started_at_ms, inputs_digest, status, objective, \
         duration_ms, services, generation, detail) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(run.id)
    .bind(run.started_at_ms)
    .bind(&run.inputs_digest)
    .bind(&run.status)
    .bind(run.objective)
    .bind(run.duration_ms)
    .bind(run.services)
    .bind(run.generation)
    .bind(&run.detail)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{values_list, Backend};

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
