//! LISTEN for new generations (PostgreSQL): [`Store::listen_generations`] opens a dedicated
//! connection (not from the pool) listening on [`Store::generation_channel`]. The same channel
//! carries round requests ([`Store::notify_round`]): a follower that received an input asks
//! the leader, wherever it runs, for a round at once instead of at its next solve interval.

use sqlx::postgres::PgListener;

use crate::{Result, Store, StoreError};

/// The payload of a round request on the generation channel.
const ROUND: &str = "round";

/// What a listener hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// A generation was published (its number).
    Generation(i64),
    /// A replica asks the leader for a round.
    Round,
}

/// A connection listening for the numbers of new generations.
#[derive(Debug)]
pub struct GenerationListener {
    inner: PgListener,
}

impl Store {
    /// Connects a listener on this store's generation channel. `None` on SQLite (one process:
    /// nobody else publishes).
    ///
    /// # Errors
    /// A connection or LISTEN failure.
    pub async fn listen_generations(&self) -> Result<Option<GenerationListener>> {
        let Some(channel) = self.generation_channel() else {
            return Ok(None);
        };
        let mut inner = PgListener::connect(self.url()).await?;
        inner.listen(channel).await?;
        Ok(Some(GenerationListener { inner }))
    }

    /// Asks the leader for a round (PostgreSQL: a NOTIFY on the generation channel; nothing on
    /// SQLite, where this process is the leader).
    ///
    /// # Errors
    /// A database error.
    pub async fn notify_round(&self) -> Result<()> {
        let Some(channel) = self.generation_channel() else {
            return Ok(());
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(ROUND)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

impl GenerationListener {
    /// The next notice; `Ok(None)` when the connection was lost (notifications sent
    /// meanwhile are gone: reconnect and catch up from the table).
    ///
    /// # Errors
    /// A database error; a payload that is neither a generation number nor a round request.
    pub async fn recv(&mut self) -> Result<Option<Notice>> {
        let Some(n) = self.inner.try_recv().await? else {
            return Ok(None);
        };
        if n.payload() == ROUND {
            return Ok(Some(Notice::Round));
        }
        n.payload()
            .parse()
            .map(|g| Some(Notice::Generation(g)))
            .map_err(|_| StoreError::Notification(n.payload().to_owned()))
    }
}
