//! Clusters, their agents (nodes) and the agents' acknowledgements.

use sqlx::Row;

use crate::records::{AckRecord, AgentRecord, ClusterRecord};
use crate::{b2i, last_per_key, values_list, Result, Store};

/// Rows of `acks` per INSERT statement in [`Store::ack_many`] (7 parameters each, under
/// SQLite's 32,766 and PostgreSQL's 65,535 bind limits).
pub(crate) const ACK_ROWS_PER_INSERT: usize = 1000;

impl Store {
    /// Inserts or updates a cluster and one of its agents, atomically.
    ///
    /// # Errors
    /// [`StoreError::Limit`](crate::StoreError::Limit) for a new node beyond
    /// [`StoreLimits::max_nodes_per_cluster`](crate::StoreLimits) (nothing stored); a
    /// database error.
    pub async fn register(&self, cluster: &ClusterRecord, agent: &AgentRecord) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        self.check_node_limit(&mut tx, &agent.cluster_id, &agent.node_name)
            .await?;
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
        Ok(sqlx::query_as::<_, ClusterRecord>(
            "SELECT cluster_id, region, zone, provider, gateway_address, registered_at_ms, \
             updated_at_ms FROM clusters ORDER BY cluster_id",
        )
        .fetch_all(&self.pool)
        .await?)
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
        Ok(sqlx::query_as::<_, AgentRecord>(
            "SELECT a.cluster_id, a.node_name, a.agent_version, a.registered_at_ms, \
             a.last_report_ms, \
             COALESCE((SELECT MAX(k.generation) FROM acks k WHERE k.cluster_id = a.cluster_id \
              AND k.node_name = a.node_name AND k.applied = 1), 0) AS acked_generation \
             FROM agents a ORDER BY a.cluster_id, a.node_name",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Every stored acknowledgement, sorted by cluster, node, service.
    ///
    /// # Errors
    /// A database error.
    pub async fn acks(&self) -> Result<Vec<AckRecord>> {
        let rows = sqlx::query(
            "SELECT cluster_id, node_name, service, generation, applied, error, acked_at_ms \
             FROM acks ORDER BY cluster_id, node_name, service",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let applied: i64 = r.try_get("applied")?;
                Ok(AckRecord {
                    cluster_id: r.try_get("cluster_id")?,
                    node_name: r.try_get("node_name")?,
                    service: r.try_get("service")?,
                    generation: r.try_get("generation")?,
                    applied: applied != 0,
                    error: r.try_get("error")?,
                    acked_at_ms: r.try_get("acked_at_ms")?,
                })
            })
            .collect()
    }

    /// Stores an acknowledgement (replacing the previous one of its key): [`Store::ack_many`]
    /// of one.
    ///
    /// # Errors
    /// A database error.
    pub async fn ack(&self, a: &AckRecord) -> Result<()> {
        self.ack_many(std::slice::from_ref(a)).await
    }

    /// Stores acknowledgements in one transaction (each replacing the previous one of its
    /// key), with multi-row upserts of up to [`ACK_ROWS_PER_INSERT`] rows each. When a key
    /// occurs more than once the last occurrence wins (PostgreSQL refuses a multi-row upsert
    /// that touches one row twice, so the batch is deduplicated first). Empty: no query.
    ///
    /// # Errors
    /// A database error (then none of them is stored).
    pub async fn ack_many(&self, acks: &[AckRecord]) -> Result<()> {
        let acks = last_per_key(acks, |a| {
            (
                a.cluster_id.as_str(),
                a.node_name.as_str(),
                a.service.as_str(),
            )
        });
        if acks.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for chunk in acks.chunks(ACK_ROWS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO acks (cluster_id, node_name, service, generation, applied, error, \
                 acked_at_ms) VALUES {} \
                 ON CONFLICT (cluster_id, node_name, service) DO UPDATE SET \
                 generation = excluded.generation, applied = excluded.applied, \
                 error = excluded.error, acked_at_ms = excluded.acked_at_ms",
                values_list(self.backend, chunk.len(), 7)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for a in chunk {
                q = q
                    .bind(&a.cluster_id)
                    .bind(&a.node_name)
                    .bind(&a.service)
                    .bind(a.generation)
                    .bind(b2i(a.applied))
                    .bind(&a.error)
                    .bind(a.acked_at_ms);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
