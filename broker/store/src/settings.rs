//! Operator settings: egress prices per tier and policies (cluster-wide and per service).

use sqlx::Row;

use crate::records::PolicyRecord;
use crate::{Result, Store};

impl Store {
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
        Ok(sqlx::query_as::<_, PolicyRecord>(
            "SELECT scope, policy, params FROM policies ORDER BY scope",
        )
        .fetch_all(&self.pool)
        .await?)
    }
}
