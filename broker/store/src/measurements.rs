//! Reports: the latest RTT, RPS and capacity samples per node, each node's import
//! declaration and the imports it cannot steer for want of a VIP.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::Row;

use crate::records::{
    CapacityRecord, ImportDeclaration, ReportRecord, RpsRecord, RttRecord, WithoutVipRecord,
};
use crate::{b2i, last_per_key, values_list, Result, Store, StoreError, WEIGHT_ROWS_PER_INSERT};

/// Samples per INSERT statement in [`Store::store_report`] (at most 7 parameters each, under
/// SQLite's 32,766 and PostgreSQL's 65,535 bind limits).
const SAMPLE_ROWS_PER_INSERT: usize = 1000;

/// `capacity_latest.service_*` of a sample without a declared service-time curve.
const NO_CURVE: f64 = -1.0;

/// The nodes whose imports count as of a cut (`$1` = `$2` = the cut): those heard from
/// since, or all of a cluster's when none was. Followed by a SELECT and [`COUNTED_FROM`].
const COUNTED_IMPORTS: &str = "WITH h AS (SELECT d.cluster_id, d.node_name, \
    CASE WHEN COALESCE(a.last_report_ms, 0) > d.declared_at_ms \
    THEN a.last_report_ms ELSE d.declared_at_ms END AS heard \
    FROM import_declarations d LEFT JOIN agents a \
    ON a.cluster_id = d.cluster_id AND a.node_name = d.node_name), \
    f AS (SELECT cluster_id, MAX(heard) AS newest FROM h GROUP BY cluster_id)";

/// The FROM and WHERE of a query over the counted imports (see [`COUNTED_IMPORTS`]).
const COUNTED_FROM: &str = "FROM imports i \
    JOIN h ON h.cluster_id = i.cluster_id AND h.node_name = i.node_name \
    JOIN f ON f.cluster_id = i.cluster_id \
    WHERE h.heard >= $1 OR f.newest < $2";

/// The tables that hold one row per (cluster, node, service) a node states.
#[derive(Debug, Clone, Copy)]
enum NodeServices {
    /// `imports`: the services a node declares it imports.
    Imports,
    /// `services_without_vip`: the imports a node cannot steer for want of a VIP.
    WithoutVip,
}

impl NodeServices {
    fn name(self) -> &'static str {
        match self {
            Self::Imports => "imports",
            Self::WithoutVip => "services_without_vip",
        }
    }
}

impl Store {
    /// Stores one report atomically: every sample replaces the previous one of its key, and
    /// with [`ReportRecord::full_set`] the node's samples the report does not state are
    /// deleted (withdrawn) in the same transaction, and its imports without a VIP are
    /// replaced by the report's list.
    ///
    /// A report of a new node beyond [`crate::StoreLimits::max_nodes_per_cluster`], or whose
    /// imports would take its cluster (the union over its nodes) beyond
    /// [`crate::StoreLimits::max_imports_per_cluster`], is refused whole.
    ///
    /// # Errors
    /// [`StoreError::Limit`] over a limit; a database error (then nothing of the report is
    /// stored).
    pub async fn store_report(&self, report: &ReportRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        self.check_node_limit(&mut tx, &report.cluster_id, &report.node_name)
            .await?;
        if report.full_set {
            // What the node no longer states is withdrawn: its samples are replaced whole.
            for (table, cluster_column) in [
                ("rtt_latest", "src"),
                ("rps_latest", "src"),
                ("capacity_latest", "cluster_id"),
            ] {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM {table} WHERE {cluster_column} = $1 AND node_name = $2"
                )))
                .bind(&report.cluster_id)
                .bind(&report.node_name)
                .execute(&mut *tx)
                .await?;
            }
        }
        // Multi-row upserts, one statement per SAMPLE_ROWS_PER_INSERT rows; a key stated
        // twice keeps its last sample (as row-by-row upserts did; PostgreSQL refuses a
        // multi-row upsert that touches one row twice).
        let rtt = last_per_key(&report.rtt, |s| {
            (s.src.as_str(), s.dst.as_str(), s.node_name.as_str())
        });
        for chunk in rtt.chunks(SAMPLE_ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO rtt_latest (src, dst, node_name, rtt_ms, loss_ratio, reachable, \
                 measured_at_ms) VALUES {} \
                 ON CONFLICT (src, dst, node_name) DO UPDATE SET rtt_ms = excluded.rtt_ms, \
                 loss_ratio = excluded.loss_ratio, reachable = excluded.reachable, \
                 measured_at_ms = excluded.measured_at_ms",
                values_list(self.backend, chunk.len(), 7)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for s in chunk {
                q = q
                    .bind(&s.src)
                    .bind(&s.dst)
                    .bind(&s.node_name)
                    .bind(s.rtt_ms)
                    .bind(s.loss_ratio)
                    .bind(b2i(s.reachable))
                    .bind(s.measured_at_ms);
            }
            q.execute(&mut *tx).await?;
        }
        let rps = last_per_key(&report.rps, |s| {
            (
                s.src.as_str(),
                s.service.as_str(),
                s.dst.as_str(),
                s.node_name.as_str(),
            )
        });
        for chunk in rps.chunks(SAMPLE_ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO rps_latest (src, service, dst, node_name, rps, measured_at_ms, \
                 bytes_sent_per_s, bytes_received_per_s) VALUES {} \
                 ON CONFLICT (src, service, dst, node_name) DO UPDATE SET rps = excluded.rps, \
                 measured_at_ms = excluded.measured_at_ms, \
                 bytes_sent_per_s = excluded.bytes_sent_per_s, \
                 bytes_received_per_s = excluded.bytes_received_per_s",
                values_list(self.backend, chunk.len(), 8)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for s in chunk {
                q = q
                    .bind(&s.src)
                    .bind(&s.service)
                    .bind(&s.dst)
                    .bind(&s.node_name)
                    .bind(s.rps)
                    .bind(s.measured_at_ms)
                    .bind(s.bytes_sent_per_s)
                    .bind(s.bytes_received_per_s);
            }
            q.execute(&mut *tx).await?;
        }
        let capacity = last_per_key(&report.capacity, |s| {
            (
                s.cluster_id.as_str(),
                s.service.as_str(),
                s.node_name.as_str(),
            )
        });
        for chunk in capacity.chunks(SAMPLE_ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO capacity_latest (cluster_id, service, node_name, capacity_rps, \
                 measured_at_ms, service_base_ms, service_slope_ms_per_rps, \
                 measured_service_ms, load_unit) VALUES {} \
                 ON CONFLICT (cluster_id, service, node_name) DO UPDATE SET \
                 capacity_rps = excluded.capacity_rps, measured_at_ms = excluded.measured_at_ms, \
                 service_base_ms = excluded.service_base_ms, \
                 service_slope_ms_per_rps = excluded.service_slope_ms_per_rps, \
                 measured_service_ms = excluded.measured_service_ms, \
                 load_unit = excluded.load_unit",
                values_list(self.backend, chunk.len(), 9)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for s in chunk {
                q = q
                    .bind(&s.cluster_id)
                    .bind(&s.service)
                    .bind(&s.node_name)
                    .bind(s.capacity_rps)
                    .bind(s.measured_at_ms)
                    // Never NULL through sqlx's Any driver: PostgreSQL caches the statement
                    // with the type of the first NULL it saw (an integer), and a later float
                    // is refused. No curve is stored as -1 (a curve is never negative).
                    .bind(s.service_base_ms.unwrap_or(NO_CURVE))
                    .bind(s.service_slope_ms_per_rps.unwrap_or(NO_CURVE))
                    .bind(s.measured_service_ms.unwrap_or(NO_CURVE))
                    .bind(&s.load_unit);
            }
            q.execute(&mut *tx).await?;
        }
        if let Some(services) = &report.imports {
            self.replace_imports(&mut tx, report, services).await?;
            self.check_import_limit(&mut tx, &report.cluster_id).await?;
        }
        if report.full_set {
            self.replace_without_vip(&mut tx, report).await?;
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
        self.replace_node_services(tx, NodeServices::Imports, report, services)
            .await
    }

    /// Replaces one node's rows of a (cluster_id, node_name, service) table with `services`
    /// (inside the report's transaction): one DELETE, then multi-row INSERTs.
    async fn replace_node_services(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        table: NodeServices,
        report: &ReportRecord,
        services: &[String],
    ) -> Result<()> {
        let table = table.name();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DELETE FROM {table} WHERE cluster_id = $1 AND node_name = $2"
        )))
        .bind(&report.cluster_id)
        .bind(&report.node_name)
        .execute(&mut **tx)
        .await?;
        for chunk in services.chunks(WEIGHT_ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO {table} (cluster_id, node_name, service) VALUES {}",
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

    /// Refuses (before the commit) a cluster whose nodes now declare more distinct services
    /// than [`crate::StoreLimits::max_imports_per_cluster`]: one indexed COUNT over the cluster's
    /// rows, in the report's transaction.
    async fn check_import_limit(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        cluster_id: &str,
    ) -> Result<()> {
        let n: i64 =
            sqlx::query("SELECT COUNT(DISTINCT service) AS n FROM imports WHERE cluster_id = $1")
                .bind(cluster_id)
                .fetch_one(&mut **tx)
                .await?
                .try_get("n")?;
        let max = self.limits.max_imports_per_cluster;
        if u64::try_from(n).unwrap_or(0) > max {
            return Err(StoreError::Limit {
                what: format!(
                    "imports: cluster {cluster_id:?} would import {n} distinct services \
                     (the union over its nodes; max_imports_per_cluster)"
                ),
                limit: max,
                flag: "--max-imports-per-cluster",
            });
        }
        Ok(())
    }

    /// Replaces one node's imports without a VIP (inside the report's transaction).
    async fn replace_without_vip(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        report: &ReportRecord,
    ) -> Result<()> {
        self.replace_node_services(
            tx,
            NodeServices::WithoutVip,
            report,
            &report.services_without_vip,
        )
        .await
    }

    /// Every node's imports without a VIP, sorted by cluster, node, service.
    ///
    /// # Errors
    /// A database error.
    pub async fn services_without_vip(&self) -> Result<Vec<WithoutVipRecord>> {
        Ok(sqlx::query_as::<_, WithoutVipRecord>(
            "SELECT cluster_id, node_name, service FROM services_without_vip \
             ORDER BY cluster_id, node_name, service",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Deletes the import declarations (and imports without a VIP) of nodes not heard from
    /// (declaration or report) since `cut_ms`. Returns how many nodes' declarations were deleted.
    ///
    /// # Errors
    /// A database error (then nothing is deleted).
    pub async fn prune_import_declarations(&self, cut_ms: i64) -> Result<u64> {
        let gone: Vec<(String, String)> = self
            .declaration_heads()
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
            for table in ["imports", "import_declarations", "services_without_vip"] {
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

    /// Every node's import declaration head (no services): one row per declaring node.
    async fn declaration_heads(&self) -> Result<Vec<ImportDeclaration>> {
        let decls = sqlx::query(
            "SELECT d.cluster_id, d.node_name, d.declared_at_ms, \
             COALESCE(a.last_report_ms, d.declared_at_ms) AS last_report_ms \
             FROM import_declarations d LEFT JOIN agents a \
             ON a.cluster_id = d.cluster_id AND a.node_name = d.node_name \
             ORDER BY d.cluster_id, d.node_name",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(decls.len());
        for r in &decls {
            let declared_at_ms: i64 = r.try_get("declared_at_ms")?;
            let last_report_ms: i64 = r.try_get("last_report_ms")?;
            out.push(ImportDeclaration {
                cluster_id: r.try_get("cluster_id")?,
                node_name: r.try_get("node_name")?,
                declared_at_ms,
                heard_at_ms: declared_at_ms.max(last_report_ms),
                services: BTreeSet::new(),
            });
        }
        Ok(out)
    }

    /// Every node's import declaration (nodes that never declared have none). Reads one row
    /// per (node, service): for tests and tools; a round reads [`Store::cluster_imports`].
    ///
    /// # Errors
    /// A database error.
    pub async fn imports(&self) -> Result<Vec<ImportDeclaration>> {
        let mut out: BTreeMap<(String, String), ImportDeclaration> = self
            .declaration_heads()
            .await?
            .into_iter()
            .map(|d| ((d.cluster_id.clone(), d.node_name.clone()), d))
            .collect();
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

    /// Each declaring cluster's imports as of the freshness cut `cut_ms`, aggregated in the
    /// database: one [`ImportDeclaration`] per cluster (`node_name` empty) whose services are
    /// the distinct services of its nodes heard from at or after `cut_ms`, or of all its
    /// nodes when none was, and whose times are the newest of its nodes. What is read grows
    /// with clusters x distinct services, not with nodes x services.
    ///
    /// # Errors
    /// A database error.
    pub async fn cluster_imports(&self, cut_ms: i64) -> Result<Vec<ImportDeclaration>> {
        let mut out: BTreeMap<String, ImportDeclaration> = self
            .cluster_import_heads()
            .await?
            .into_iter()
            .map(|d| (d.cluster_id.clone(), d))
            .collect();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{COUNTED_IMPORTS} SELECT DISTINCT i.cluster_id, i.service {COUNTED_FROM}"
        )))
        .bind(cut_ms)
        .bind(cut_ms)
        .fetch_all(&self.pool)
        .await?;
        for r in &rows {
            let cluster: String = r.try_get("cluster_id")?;
            if let Some(d) = out.get_mut(&cluster) {
                d.services.insert(r.try_get("service")?);
            }
        }
        Ok(out.into_values().collect())
    }

    /// How many distinct services each declaring cluster imports as of `cut_ms` (the
    /// length of [`Store::cluster_imports`]' sets; a cluster that declared nothing is absent),
    /// counted in the database without reading the names.
    ///
    /// # Errors
    /// A database error.
    pub async fn cluster_import_counts(&self, cut_ms: i64) -> Result<BTreeMap<String, u64>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{COUNTED_IMPORTS} SELECT i.cluster_id, COUNT(DISTINCT i.service) AS n \
             {COUNTED_FROM} GROUP BY i.cluster_id"
        )))
        .bind(cut_ms)
        .bind(cut_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let n: i64 = r.try_get("n")?;
                Ok((r.try_get("cluster_id")?, u64::try_from(n).unwrap_or(0)))
            })
            .collect()
    }

    /// Each declaring cluster with the newest times of its nodes and no services
    /// ([`Store::cluster_imports`] without reading the names).
    ///
    /// # Errors
    /// A database error.
    pub async fn cluster_import_heads(&self) -> Result<Vec<ImportDeclaration>> {
        let mut out: BTreeMap<String, ImportDeclaration> = BTreeMap::new();
        for d in self.declaration_heads().await? {
            let e = out
                .entry(d.cluster_id.clone())
                .or_insert_with(|| ImportDeclaration {
                    cluster_id: d.cluster_id.clone(),
                    node_name: String::new(),
                    declared_at_ms: i64::MIN,
                    heard_at_ms: i64::MIN,
                    services: BTreeSet::new(),
                });
            e.declared_at_ms = e.declared_at_ms.max(d.declared_at_ms);
            e.heard_at_ms = e.heard_at_ms.max(d.heard_at_ms);
        }
        Ok(out.into_values().collect())
    }

    /// The distinct services that have a stored capacity or RPS sample.
    ///
    /// # Errors
    /// A database error.
    pub async fn services(&self) -> Result<BTreeSet<String>> {
        let rows =
            sqlx::query("SELECT service FROM capacity_latest UNION SELECT service FROM rps_latest")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>("service")?))
            .collect()
    }

    /// Every stored RTT sample.
    ///
    /// # Errors
    /// A database error.
    pub async fn rtt(&self) -> Result<Vec<RttRecord>> {
        Ok(sqlx::query_as::<_, RttRecord>(
            "SELECT src, dst, node_name, rtt_ms, loss_ratio, reachable, measured_at_ms \
             FROM rtt_latest ORDER BY src, dst, node_name",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every stored RPS sample.
    ///
    /// # Errors
    /// A database error.
    pub async fn rps(&self) -> Result<Vec<RpsRecord>> {
        Ok(sqlx::query_as::<_, RpsRecord>(
            "SELECT src, service, dst, node_name, rps, measured_at_ms, bytes_sent_per_s, \
             bytes_received_per_s FROM rps_latest \
             ORDER BY src, service, dst, node_name",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every stored capacity sample.
    ///
    /// # Errors
    /// A database error.
    pub async fn capacity(&self) -> Result<Vec<CapacityRecord>> {
        Ok(sqlx::query_as::<_, CapacityRecord>(
            "SELECT cluster_id, service, node_name, capacity_rps, measured_at_ms, \
             CASE WHEN service_base_ms >= 0 AND service_slope_ms_per_rps >= 0 \
             THEN service_base_ms END AS service_base_ms, \
             CASE WHEN service_base_ms >= 0 AND service_slope_ms_per_rps >= 0 \
             THEN service_slope_ms_per_rps END AS service_slope_ms_per_rps, \
             CASE WHEN measured_service_ms >= 0 THEN measured_service_ms END \
             AS measured_service_ms, load_unit \
             FROM capacity_latest ORDER BY cluster_id, service, node_name",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}
