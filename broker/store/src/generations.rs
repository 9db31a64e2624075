//! Published weights generations: each stores the (service, source) pairs that changed;
//! the weights in force are each pair's newest rows. Retention prunes what no kept
//! generation reads.

use std::num::NonZeroU64;

use sqlx::Row;

use crate::records::{PruneStats, SolverRunRecord, WeightRecord};
use crate::runs::{delete_runs_beyond, insert_run};
use crate::LeaderTerm;
use crate::{values_list, Result, Store, WEIGHT_ROWS_PER_INSERT};

impl Store {
    /// Stores a new generation and its solver run, atomically, as `leader`, and returns its
    /// number. In one transaction: locks the lease row and refuses
    /// ([`StoreError::Fenced`](crate::StoreError::Fenced)) unless `leader` holds it under its
    /// term, unexpired; numbers the generation `MAX(generation) + 1` (the newest is never
    /// pruned, so numbers strictly increase and are never reused, across leaders too); writes
    /// it with the leader's term, and the run with that generation; on PostgreSQL notifies
    /// [`Store::generation_channel`] with the number (delivered at commit).
    ///
    /// A generation stores what changed: `weights` holds every row of each (service, source)
    /// whose weights are new or changed (they replace that pair's rows), `removed` the pairs
    /// that no longer have weights; every other pair keeps its rows from an earlier generation
    /// ([`Store::weights_of`] reads the newest rows of each pair).
    ///
    /// # Errors
    /// `Fenced`, or a database error (then nothing is stored).
    pub async fn publish(
        &self,
        leader: &LeaderTerm,
        created_at_ms: i64,
        weights: &[WeightRecord],
        removed: &[(String, String)],
        run: &SolverRunRecord,
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        self.fence(&mut tx, leader).await?;
        let generation: i64 =
            sqlx::query("SELECT COALESCE(MAX(generation), 0) + 1 AS g FROM generations")
                .fetch_one(&mut *tx)
                .await?
                .try_get("g")?;
        sqlx::query(
            "INSERT INTO generations (generation, created_at_ms, solver_run_id, term) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(generation)
        .bind(created_at_ms)
        .bind(run.id)
        .bind(leader.term)
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
        let run = SolverRunRecord {
            generation,
            ..run.clone()
        };
        insert_run(&mut tx, &run).await?;
        if let Some(channel) = &self.channel {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(channel)
                .bind(generation.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(generation)
    }

    /// The term of the leader that published `generation` (`None`: not stored).
    ///
    /// # Errors
    /// A database error.
    pub async fn generation_term(&self, generation: i64) -> Result<Option<i64>> {
        Ok(
            sqlx::query("SELECT term FROM generations WHERE generation = $1")
                .bind(generation)
                .fetch_optional(&self.pool)
                .await?
                .map(|r| r.try_get("term"))
                .transpose()?,
        )
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
        Ok(sqlx::query_as::<_, WeightRecord>(
            "SELECT service, src, dst, weight, status, reason, policy, params, computed_at_ms \
             FROM weights w WHERE w.dst <> '' \
             AND EXISTS (SELECT 1 FROM generations g WHERE g.generation = $1) \
             AND w.generation = (SELECT MAX(x.generation) FROM weights x \
                 WHERE x.service = w.service AND x.src = w.src AND x.generation <= $1) \
             ORDER BY service, src, dst",
        )
        .bind(generation)
        .fetch_all(&self.pool)
        .await?)
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
}
