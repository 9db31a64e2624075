//! Leadership of broker replicas: a lease row (`leader_lease`, id 1) and the fencing of
//! publishes by its term.
//!
//! A replica leads while it holds the row (`holder` = its replica id) and the row has not
//! expired. [`Store::acquire_lease`] is one UPDATE that takes the row only when it has expired
//! (or, `force`, whatever its state: SQLite's single process at start), bumping the term;
//! [`Store::renew_lease`] is one UPDATE that extends it only for the same holder and term
//! while unexpired. [`Store::publish`](crate::Store::publish) locks the row in the publishing
//! transaction and refuses ([`StoreError::Fenced`](crate::StoreError::Fenced)) unless the
//! publisher still holds it under its term: a leader that was paused past its lease, and
//! replaced, can never publish again under its old term.
//!
//! Times are the DATABASE's clock on PostgreSQL (`now()`), so the replicas' clock skew does
//! not matter; on SQLite (one process) the process's clock through SQLite's `julianday`.
//!
//! Why a lease row and not an advisory lock (`pg_try_advisory_lock`): an advisory lock is
//! held by a session for as long as the session lives. A leader that is SIGSTOPped (or stuck
//! in a GC pause, or partitioned with its TCP connection still open) keeps its session, so
//! the lock never passes to another replica until the kernel's TCP keepalive gives up —
//! possibly hours — and when the process resumes it believes it still leads. A lease
//! expires on the database's clock whatever the holder does, another replica takes it with a
//! higher term, and the term fences the old holder's writes when it wakes up.

use sqlx::Row;

use crate::{Backend, Result, Store};

/// What a leader proves when it publishes: its replica id and the term it acquired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderTerm {
    pub holder: String,
    pub term: i64,
}

/// The lease row as read, with the database's clock at the read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    pub holder: String,
    pub term: i64,
    pub expires_at_ms: i64,
    /// The database's (SQLite: the process's) clock when read.
    pub now_ms: i64,
}

impl LeaseState {
    /// Whether the lease is held and unexpired as of the read.
    #[must_use]
    pub fn live(&self) -> bool {
        self.expires_at_ms > self.now_ms
    }
}

/// The SQL expression of "now" in milliseconds since the epoch for `backend`.
pub(crate) fn now_sql(backend: Backend) -> &'static str {
    match backend {
        Backend::Postgres => "CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT)",
        Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
    }
}

fn millis(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Store {
    /// Takes the lease for `holder` for `lease` when it has expired (or whatever its state
    /// with `force`), bumping the term. Returns the new term, or `None` when another holder's
    /// lease is live (or `holder` still holds it: renew that one instead).
    ///
    /// # Errors
    /// A database error.
    pub async fn acquire_lease(
        &self,
        holder: &str,
        lease: std::time::Duration,
        force: bool,
    ) -> Result<Option<LeaderTerm>> {
        let now = now_sql(self.backend);
        let sql = format!(
            "UPDATE leader_lease SET holder = $1, term = term + 1, expires_at_ms = {now} + $2 \
             WHERE id = 1 AND (expires_at_ms <= {now} OR $3 = 1) RETURNING term"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(holder)
            .bind(millis(lease))
            .bind(i64::from(force))
            .fetch_optional(&self.lease_pool)
            .await?;
        row.map(|r| {
            Ok(LeaderTerm {
                holder: holder.to_owned(),
                term: r.try_get("term")?,
            })
        })
        .transpose()
    }

    /// Extends `leader`'s lease by `lease` from now, if it still holds it and it has not
    /// expired. Returns whether it did (false: lost, stop leading).
    ///
    /// # Errors
    /// A database error (the lease may still be live: retry until it would have ended).
    pub async fn renew_lease(
        &self,
        leader: &LeaderTerm,
        lease: std::time::Duration,
    ) -> Result<bool> {
        let now = now_sql(self.backend);
        let sql = format!(
            "UPDATE leader_lease SET expires_at_ms = {now} + $3 \
             WHERE id = 1 AND holder = $1 AND term = $2 AND expires_at_ms > {now}"
        );
        let n = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&leader.holder)
            .bind(leader.term)
            .bind(millis(lease))
            .execute(&self.lease_pool)
            .await?
            .rows_affected();
        Ok(n == 1)
    }

    /// Ends `leader`'s lease now (a clean shutdown: another replica takes over at its next
    /// attempt instead of after the lease). Nothing when it no longer holds it.
    ///
    /// # Errors
    /// A database error.
    pub async fn release_lease(&self, leader: &LeaderTerm) -> Result<()> {
        sqlx::query(
            "UPDATE leader_lease SET expires_at_ms = 0 WHERE id = 1 AND holder = $1 AND term = $2",
        )
        .bind(&leader.holder)
        .bind(leader.term)
        .execute(&self.lease_pool)
        .await?;
        Ok(())
    }

    /// The lease row now.
    ///
    /// # Errors
    /// A database error.
    pub async fn lease(&self) -> Result<LeaseState> {
        let now = now_sql(self.backend);
        let sql = format!(
            "SELECT holder, term, expires_at_ms, {now} AS now_ms FROM leader_lease WHERE id = 1"
        );
        let r = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.lease_pool)
            .await?;
        Ok(LeaseState {
            holder: r.try_get("holder")?,
            term: r.try_get("term")?,
            expires_at_ms: r.try_get("expires_at_ms")?,
            now_ms: r.try_get("now_ms")?,
        })
    }

    /// Locks the lease row in `tx` and refuses unless `leader` holds it, unexpired.
    pub(crate) async fn fence(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Any>,
        leader: &LeaderTerm,
    ) -> Result<()> {
        let now = now_sql(self.backend);
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => {
                // A write first: SQLite takes its (database-wide) write lock here, so the
                // check and the publish are one atomic step against other writers.
                sqlx::query("UPDATE leader_lease SET holder = holder WHERE id = 1")
                    .execute(&mut **tx)
                    .await?;
                ""
            }
        };
        let sql = format!(
            "SELECT holder, term, expires_at_ms, {now} AS now_ms FROM leader_lease \
             WHERE id = 1{lock}"
        );
        let r = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_one(&mut **tx)
            .await?;
        let holder: String = r.try_get("holder")?;
        let term: i64 = r.try_get("term")?;
        let expires: i64 = r.try_get("expires_at_ms")?;
        let now_ms: i64 = r.try_get("now_ms")?;
        if holder != leader.holder || term != leader.term || expires <= now_ms {
            return Err(crate::StoreError::Fenced {
                term: leader.term,
                current_term: term,
            });
        }
        Ok(())
    }

    /// The LISTEN/NOTIFY channel of new generations (PostgreSQL only): named after the
    /// store's schema, since channels are database-wide and several brokers (or tests) may
    /// share one database in different schemas.
    #[must_use]
    pub fn generation_channel(&self) -> Option<&str> {
        self.channel.as_deref()
    }

    /// The URL the store connected with (for a PostgreSQL listener on the same database).
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }
}

/// `ballast_gen_<schema>`, at most 63 bytes (PostgreSQL's identifier limit): a longer one is
/// cut and ends with a hash of the schema, so two long schemas do not share a channel.
pub(crate) fn channel_name(schema: &str) -> String {
    let full = format!("ballast_gen_{schema}");
    if full.len() <= 63 {
        return full;
    }
    // FNV-1a, 64 bits: stable across builds (std's hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in schema.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let hash = format!("_{h:016x}");
    let mut cut = 63 - hash.len();
    while !full.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{hash}", &full[..cut])
}

#[cfg(test)]
mod tests {
    use super::channel_name;

    #[test]
    fn channel_names_fit_postgres_identifiers_and_stay_distinct() {
        assert_eq!(channel_name("public"), "ballast_gen_public");
        let a = channel_name(&"a".repeat(80));
        let b = channel_name(&format!("{}b", "a".repeat(79)));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
    }
}
