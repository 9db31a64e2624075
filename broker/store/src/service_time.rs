//! Service-time points: (load on a cluster, measured service time) per (service, cluster),
//! recorded by the leader each round from the agents' probe samples, read back by every
//! replica to fit the curve (`engine::fit`). Kept for a window, then pruned.

use crate::records::ServiceTimePoint;
use crate::{values_list, Result, Store};

/// Points per INSERT statement (5 binds each).
const POINTS_PER_INSERT: usize = 500;

impl Store {
    /// Records points; one already there (same service, cluster and time) is kept as it was.
    ///
    /// # Errors
    /// A database error (then none of them is recorded).
    pub async fn record_service_time_points(&self, points: &[ServiceTimePoint]) -> Result<()> {
        if points.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for chunk in points.chunks(POINTS_PER_INSERT) {
            let sql = format!(
                "INSERT INTO service_time_points (service, cluster_id, at_ms, load_rps, \
                 service_ms) VALUES {} ON CONFLICT (service, cluster_id, at_ms) DO NOTHING",
                values_list(self.backend, chunk.len(), 5)
            );
            let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
            for p in chunk {
                q = q
                    .bind(&p.service)
                    .bind(&p.cluster_id)
                    .bind(p.at_ms)
                    .bind(p.load_rps)
                    .bind(p.service_ms);
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Every point measured at or after `since_ms`, by service, cluster and time.
    ///
    /// # Errors
    /// A database error.
    pub async fn service_time_points(&self, since_ms: i64) -> Result<Vec<ServiceTimePoint>> {
        Ok(sqlx::query_as::<_, ServiceTimePoint>(
            "SELECT service, cluster_id, at_ms, load_rps, service_ms FROM service_time_points \
             WHERE at_ms >= $1 ORDER BY service, cluster_id, at_ms",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Deletes the points measured before `before_ms`; returns how many.
    ///
    /// # Errors
    /// A database error.
    pub async fn prune_service_time_points(&self, before_ms: i64) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM service_time_points WHERE at_ms < $1")
                .bind(before_ms)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}
