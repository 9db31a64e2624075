//! Operator settings: egress prices per tier and policies (cluster-wide and per service).
//!
//! Each policy row has an origin: `admin` (the Admin API) or `crd` (a policy CRD, named in
//! its `source`). Precedence, one row per scope: the CRD is the declared source of truth —
//! a CRD row replaces an admin row of its scope, admin writes and clears on a CRD-held scope
//! are refused ([`StoreError::PolicyHeldByCrd`]), and [`Store::sync_crd_policies`] makes the
//! CRD rows equal the objects that exist while leaving admin rows of other scopes alone.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::Row;

use crate::records::{
    CrdPolicy, CrdPriceRecord, CrdSync, PolicyOrigin, PolicyRecord, StoredPolicy,
};
use crate::{Result, Store, StoreError};

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

    /// Replaces the policy CRD's egress price rows with `rows` (in their order), in one
    /// transaction; returns whether they changed.
    ///
    /// # Errors
    /// A database error; then nothing changed.
    pub async fn sync_crd_prices(&self, rows: &[CrdPriceRecord]) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let current = sqlx::query_as::<_, CrdPriceRecord>(
            "SELECT provider, from_region, to_region, usd_per_gb, note FROM crd_egress_prices \
             ORDER BY position",
        )
        .fetch_all(&mut *tx)
        .await?;
        if current == rows {
            return Ok(false);
        }
        sqlx::query("DELETE FROM crd_egress_prices")
            .execute(&mut *tx)
            .await?;
        for (i, r) in rows.iter().enumerate() {
            sqlx::query(
                "INSERT INTO crd_egress_prices (position, provider, from_region, to_region, \
                 usd_per_gb, note) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(i64::try_from(i).unwrap_or(i64::MAX))
            .bind(&r.provider)
            .bind(&r.from_region)
            .bind(&r.to_region)
            .bind(r.usd_per_gb)
            .bind(&r.note)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// The policy CRD's egress price rows, in their order.
    ///
    /// # Errors
    /// A database error.
    pub async fn crd_prices(&self) -> Result<Vec<CrdPriceRecord>> {
        Ok(sqlx::query_as::<_, CrdPriceRecord>(
            "SELECT provider, from_region, to_region, usd_per_gb, note FROM crd_egress_prices \
             ORDER BY position",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Sets (inserts or replaces) a policy set through the Admin API (origin `admin`).
    ///
    /// # Errors
    /// [`StoreError::PolicyHeldByCrd`] when a policy CRD holds this scope (the CRD is the
    /// declared source of truth: change or delete that object instead); a database error.
    pub async fn set_policy(&self, p: &PolicyRecord, now_ms: i64) -> Result<()> {
        let r = sqlx::query(
            "INSERT INTO policies (scope, policy, params, updated_at_ms, origin, source) \
             VALUES ($1, $2, $3, $4, 'admin', '') \
             ON CONFLICT (scope) DO UPDATE SET policy = excluded.policy, \
             params = excluded.params, updated_at_ms = excluded.updated_at_ms \
             WHERE policies.origin = 'admin'",
        )
        .bind(&p.scope)
        .bind(&p.policy)
        .bind(&p.params)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        if r.rows_affected() == 0 {
            return Err(self.held_by_crd(&p.scope).await);
        }
        Ok(())
    }

    /// Removes a policy set through the Admin API; returns whether one was there.
    ///
    /// # Errors
    /// [`StoreError::PolicyHeldByCrd`] when a policy CRD holds this scope; a database error.
    pub async fn delete_policy(&self, scope: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM policies WHERE scope = $1 AND origin = 'admin'")
            .bind(scope)
            .execute(&self.pool)
            .await?;
        if r.rows_affected() > 0 {
            return Ok(true);
        }
        match self.crd_source_of(scope).await? {
            Some(object) => Err(StoreError::PolicyHeldByCrd {
                scope: scope.to_owned(),
                object,
            }),
            None => Ok(false),
        }
    }

    /// The CRD holding `scope`, if a CRD row is there.
    async fn crd_source_of(&self, scope: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT source FROM policies WHERE scope = $1 AND origin = 'crd'")
            .bind(scope)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => Some(r.try_get("source")?),
            None => None,
        })
    }

    /// The error for an admin write refused on `scope` (or the database error met on the
    /// way: the conflict is then unexplained but still not applied).
    async fn held_by_crd(&self, scope: &str) -> StoreError {
        match self.crd_source_of(scope).await {
            Ok(Some(object)) => StoreError::PolicyHeldByCrd {
                scope: scope.to_owned(),
                object,
            },
            Ok(None) => StoreError::PolicyHeldByCrd {
                scope: scope.to_owned(),
                object: "a policy CRD (deleted since)".to_owned(),
            },
            Err(e) => e,
        }
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

    /// Every policy with where it comes from, sorted by scope.
    ///
    /// # Errors
    /// A database error, or an origin this version does not know.
    pub async fn stored_policies(&self) -> Result<Vec<StoredPolicy>> {
        Ok(sqlx::query_as::<_, StoredPolicy>(
            "SELECT scope, policy, params, origin, source FROM policies ORDER BY scope",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Makes the CRD-made policies equal `desired`, in one transaction (all or nothing):
    /// each desired row is written with origin `crd` (replacing an admin row of the same
    /// scope: the CRD wins), and every other CRD row is deleted — except those whose `source`
    /// is in `keep` (objects that exist but are invalid now: their last accepted value
    /// stays). Admin rows of other scopes are never touched. Rows already equal are not
    /// rewritten.
    ///
    /// # Errors
    /// [`StoreError::DuplicateScope`] when two desired rows share a scope (nothing is
    /// written); a database error (then nothing is changed).
    pub async fn sync_crd_policies(
        &self,
        desired: &[CrdPolicy],
        keep: &BTreeSet<String>,
        now_ms: i64,
    ) -> Result<CrdSync> {
        let mut scopes = BTreeSet::new();
        for d in desired {
            if !scopes.insert(d.scope.as_str()) {
                return Err(StoreError::DuplicateScope(d.scope.clone()));
            }
        }
        let mut out = CrdSync::default();
        let mut tx = self.pool.begin().await?;
        let existing: BTreeMap<String, StoredPolicy> = sqlx::query_as::<_, StoredPolicy>(
            "SELECT scope, policy, params, origin, source FROM policies",
        )
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|p| (p.scope.clone(), p))
        .collect();
        for d in desired {
            let old = existing.get(&d.scope);
            if old.is_some_and(|o| {
                o.origin == PolicyOrigin::Crd
                    && o.source == d.source
                    && o.policy == d.policy
                    && o.params == d.params
            }) {
                out.unchanged.push(d.scope.clone());
                continue;
            }
            sqlx::query(
                "INSERT INTO policies (scope, policy, params, updated_at_ms, origin, source) \
                 VALUES ($1, $2, $3, $4, 'crd', $5) \
                 ON CONFLICT (scope) DO UPDATE SET policy = excluded.policy, \
                 params = excluded.params, updated_at_ms = excluded.updated_at_ms, \
                 origin = excluded.origin, source = excluded.source",
            )
            .bind(&d.scope)
            .bind(&d.policy)
            .bind(&d.params)
            .bind(now_ms)
            .bind(&d.source)
            .execute(&mut *tx)
            .await?;
            if old.is_some_and(|o| o.origin == PolicyOrigin::Admin) {
                out.replaced_admin.push(d.scope.clone());
            }
            out.written.push(d.scope.clone());
        }
        for (scope, row) in &existing {
            if row.origin != PolicyOrigin::Crd || scopes.contains(scope.as_str()) {
                continue;
            }
            if keep.contains(&row.source) {
                out.kept.push(scope.clone());
                continue;
            }
            sqlx::query("DELETE FROM policies WHERE scope = $1 AND origin = 'crd'")
                .bind(scope)
                .execute(&mut *tx)
                .await?;
            out.deleted.push(scope.clone());
        }
        tx.commit().await?;
        Ok(out)
    }
}
