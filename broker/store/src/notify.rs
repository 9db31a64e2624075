//! LISTEN for new generations (PostgreSQL): [`Store::listen_generations`] opens a dedicated
//! connection (not from the pool) listening on [`Store::generation_channel`].

use sqlx::postgres::PgListener;

use crate::{Result, Store, StoreError};

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
}

impl GenerationListener {
    /// The next notified generation; `Ok(None)` when the connection was lost (notifications
    /// sent meanwhile are gone: reconnect and catch up from the table).
    ///
    /// # Errors
    /// A database error; a payload that is not a generation number.
    pub async fn recv(&mut self) -> Result<Option<i64>> {
        let Some(n) = self.inner.try_recv().await? else {
            return Ok(None);
        };
        n.payload()
            .parse()
            .map(Some)
            .map_err(|_| StoreError::Notification(n.payload().to_owned()))
    }
}
