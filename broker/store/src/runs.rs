//! A record of each solver run, bounded to the newest ones.

use std::num::NonZeroU64;

use sqlx::Row;

use crate::records::SolverRunRecord;
use crate::{Result, Store};

impl Store {
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
        Ok(sqlx::query_as::<_, SolverRunRecord>(
            "SELECT id, started_at_ms, inputs_digest, status, objective, duration_ms, services, \
             generation, detail FROM solver_runs ORDER BY id DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}

/// Deletes every solver run older than the newest `keep` (by id); the count deleted.
pub(crate) async fn delete_runs_beyond(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    keep: i64,
) -> Result<u64> {
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

pub(crate) async fn insert_run(
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
