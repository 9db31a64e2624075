//! Replicas: one elected solver, every replica serving.
//!
//! Every replica accepts Register/Report/AckWeights (store writes) and serves WatchWeights,
//! WatchPeers and Admin. Only the leader — the replica holding the store's lease row
//! ([`ballast_store::LeaderTerm`], see the store's `lease` module for why a row and not an
//! advisory lock) — runs solve rounds that publish, and every publish is fenced by its term
//! in the publishing transaction.
//!
//! - [`Engine::lead`]: every lease/3 the leader renews its lease; a follower tries to take
//!   it (one cheap UPDATE that succeeds only on an expired row). A leader that cannot renew
//!   stops publishing when its lease would end, measured from before its last successful
//!   renewal (so before the database's expiry); one whose renewal is refused, or whose
//!   publish is fenced, steps down at once. A new leader loads the latest generation and the
//!   run sequence from the store before its first round, and asks for a round.
//! - [`Engine::follow`] (PostgreSQL): LISTENs on the store's generation channel; each
//!   notified generation is loaded (`weights_of`) and replaces the published watch channel,
//!   so this replica's watchers get it at once; after each (re)connection it catches up on
//!   the latest stored generation (no poll loop). The peer set is refreshed on each
//!   notification too.
//! - Partition: a replica whose lease calls have not reached the database for longer than
//!   the lease, or whose listener has been disconnected that long, is unavailable
//!   ([`Engine::availability`]): `/ready` answers 503 with the reason, WatchWeights streams
//!   end with UNAVAILABLE and new ones are refused until the database is back; it recovers
//!   on its own (the listener reconnects and catches up, the lease calls succeed again).
//!
//! On SQLite (one process) the replica takes the lease by force at start (`force`).

use std::sync::Arc;
use std::time::Duration;

use ballast_store::{LeaderTerm, Notice, StoreError};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{gauge_i64, published_of, Engine, EngineError, Published};

/// The shortest gap between two round requests a follower sends the leader.
pub const KICK_GAP: Duration = Duration::from_millis(50);

/// Aborts a task when dropped (the follower's kick task ends with `follow`).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How this replica takes part in leadership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaConfig {
    /// This replica's id (the lease holder's name): `<hostname>-<pid>` by default.
    pub replica_id: String,
    /// The lease time; renewals and take-over attempts every third of it.
    pub lease: Duration,
    /// Take the lease by force at load (SQLite's single process) instead of waiting for an
    /// expired lease.
    pub force: bool,
    /// Tests only (`BALLAST_TEST_SLOW_ROUND_MS`): a round that has a new generation waits
    /// this long before publishing it, as a slow solve would — the window in which the
    /// fencing test pauses a leader, so that its publish meets the store's fence.
    pub slow_round: Option<Duration>,
}

impl ReplicaConfig {
    /// In-process use (tests, benchmarks, `Engine::load`): the lease taken by force at load,
    /// for an hour.
    #[must_use]
    pub fn embedded() -> Self {
        Self {
            replica_id: default_replica_id(),
            lease: Duration::from_secs(3600),
            force: true,
            slow_round: None,
        }
    }

    /// The renewal (and take-over attempt) period: a third of the lease, so a leader has
    /// two more tries after a failed renewal before its lease ends.
    #[must_use]
    pub fn renew_period(&self) -> Duration {
        self.lease / 3
    }
}

/// `<hostname>-<pid>`.
#[must_use]
pub fn default_replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "broker".into());
    format!("{host}-{}", std::process::id())
}

/// This replica's role.
#[derive(Debug, Clone, Default)]
pub(crate) struct RoleState {
    /// The term this replica leads, and until when (local clock) it may publish.
    pub leading: Option<(LeaderTerm, Instant)>,
    /// The highest term seen (led or observed).
    pub term: i64,
    /// When a lease call last reached the database.
    pub last_db_ok: Option<Instant>,
    /// Since when the generation listener is disconnected (`None`: connected, or SQLite).
    pub listener_down_since: Option<Instant>,
}

impl Engine {
    fn with_role<T>(&self, f: impl FnOnce(&mut RoleState) -> T) -> T {
        match self.role.lock() {
            Ok(mut r) => f(&mut r),
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// The term this replica may publish under now: it holds the lease and its lease has
    /// not ended by the local, conservative, deadline.
    #[must_use]
    pub fn leading(&self) -> Option<LeaderTerm> {
        self.with_role(|r| match &r.leading {
            Some((t, until)) if Instant::now() < *until => Some(t.clone()),
            _ => None,
        })
    }

    /// `leader term N` or `follower (leader term N)`, for `/ready`.
    #[must_use]
    pub fn role_line(&self) -> String {
        self.with_role(|r| match &r.leading {
            Some((t, _)) => format!("leader term {}", t.term),
            None => format!("follower (leader term {})", r.term),
        })
    }

    /// `Err(reason)` while this replica cannot vouch for its state: its lease calls have not
    /// reached the database, or its generation listener has been disconnected, for longer
    /// than the lease.
    ///
    /// # Errors
    /// The reason.
    pub fn availability(&self) -> Result<(), String> {
        // A single-writer store (SQLite, held under its file lock): no other replica can lead,
        // so a slow database is only slow, never a partition (the store ping of /ready still
        // says when it does not answer).
        if self.replica.force {
            return Ok(());
        }
        let lease = self.replica.lease;
        let now = Instant::now();
        self.with_role(|r| {
            let mut reasons = Vec::new();
            let since_ok = r.last_db_ok.map_or(now - self.started, |t| now - t);
            if since_ok > lease {
                reasons.push(format!(
                    "partitioned: the database has not answered a lease call for {:.1} s \
                     (longer than the lease, {:.1} s)",
                    since_ok.as_secs_f64(),
                    lease.as_secs_f64()
                ));
            }
            if let Some(t) = r.listener_down_since {
                let down = now - t;
                if down > lease {
                    reasons.push(format!(
                        "partitioned: the generation listener has been disconnected for \
                         {:.1} s (longer than the lease, {:.1} s)",
                        down.as_secs_f64(),
                        lease.as_secs_f64()
                    ));
                }
            }
            if reasons.is_empty() {
                Ok(())
            } else {
                Err(reasons.join("; "))
            }
        })
    }

    /// A receiver of whether this replica is available ([`Engine::availability`]);
    /// WatchWeights streams end when it turns false.
    #[must_use]
    pub fn subscribe_available(&self) -> watch::Receiver<bool> {
        self.available.subscribe()
    }

    fn update_available(&self) {
        let verdict = self.availability();
        let ok = verdict.is_ok();
        let changed = self.available.send_if_modified(|cur| {
            let changed = *cur != ok;
            *cur = ok;
            changed
        });
        if changed {
            match verdict {
                Ok(()) => info!("database reachable again: serving weights"),
                Err(r) => warn!(reason = %r, "unavailable: ending weight streams"),
            }
        }
    }

    pub(crate) fn seen_term(&self, term: i64) {
        let t = self.with_role(|r| {
            r.term = r.term.max(term);
            r.term
        });
        self.metrics.term.set(t);
    }

    /// Takes the lease by force (SQLite's single process at start) and leads.
    ///
    /// # Errors
    /// A store error.
    pub(crate) async fn acquire_forced(&self) -> Result<(), EngineError> {
        let started = Instant::now();
        if let Some(t) = self
            .store
            .acquire_lease(&self.replica.replica_id, self.replica.lease, true)
            .await?
        {
            self.become_leader(t, started).await?;
        }
        Ok(())
    }

    async fn become_leader(&self, t: LeaderTerm, started: Instant) -> Result<(), EngineError> {
        {
            // Before the first round: the latest generation and the run sequence.
            let mut rs = self.round.lock().await;
            self.catch_up().await?;
            rs.next_run_id = self.store.last_run_id().await? + 1;
            rs.memory = super::RoundMemory::default();
        }
        let term = t.term;
        self.with_role(|r| {
            r.leading = Some((t, started + self.replica.lease));
            r.last_db_ok = Some(started);
        });
        self.seen_term(term);
        self.metrics.leader.set(1);
        self.metrics.leader_changes.inc();
        info!(replica = %self.replica.replica_id, term, "leader: took the lease");
        self.trigger();
        Ok(())
    }

    /// Stops leading at once (the lease was lost, or a publish fenced).
    pub(crate) fn step_down(&self, why: &str) {
        let was = self.with_role(|r| r.leading.take());
        if let Some((t, _)) = was {
            self.metrics.leader.set(0);
            self.metrics.leader_changes.inc();
            info!(replica = %self.replica.replica_id, term = t.term, why, "follower: stepped down");
        }
    }

    /// A publish was refused: another replica leads under `current_term`.
    pub(crate) fn fenced(&self, e: &StoreError) {
        if let StoreError::Fenced { current_term, .. } = e {
            self.seen_term(*current_term);
        }
        self.metrics.fenced_publishes.inc();
        warn!(error = %e, "publish fenced");
        self.step_down("publish fenced");
    }

    /// Loads the latest stored generation when it is newer than the published one.
    async fn catch_up(&self) -> Result<(), EngineError> {
        let last = self.store.last_generation().await?;
        self.load_generation(last).await
    }

    /// Loads `generation` and replaces the published one with it, when it is newer.
    async fn load_generation(&self, generation: i64) -> Result<(), EngineError> {
        let g = u64::try_from(generation).unwrap_or(0);
        if g <= self.current().generation {
            return Ok(());
        }
        let p = published_of(self.store.weights_of(generation).await?, g, &self.cfg);
        if self.publish_local(Arc::new(p)) {
            debug!(generation, "loaded a generation published by the leader");
        }
        Ok(())
    }

    /// Replaces the published generation by `p` unless that is not newer; mirrors metrics.
    pub(crate) fn publish_local(&self, p: Arc<Published>) -> bool {
        let replaced = self.published.send_if_modified(|cur| {
            if p.generation > cur.generation {
                *cur = p.clone();
                true
            } else {
                false
            }
        });
        if replaced {
            super::mirror_published(&self.metrics, &p);
            self.metrics.generation.set(gauge_i64(p.generation));
        }
        replaced
    }

    /// The leadership loop: renew (leader) or try to take (follower) the lease every
    /// lease/3, and re-judge availability, until `shutdown`. A leader releases its lease on
    /// the way out.
    pub async fn lead(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        {
            let period = self.replica.renew_period();
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.changed() => break,
                }
                if *shutdown.borrow() {
                    break;
                }
                self.lease_step(period).await;
                self.update_available();
            }
            if let Some((t, _)) = self.with_role(|r| r.leading.take()) {
                self.metrics.leader.set(0);
                match tokio::time::timeout(period, self.store.release_lease(&t)).await {
                    Ok(Ok(())) => info!(term = t.term, "released the lease"),
                    _ => warn!(term = t.term, "could not release the lease; it expires"),
                }
            }
        }
    }

    /// One leadership step now (renew, or try to take the lease), as the loop does every
    /// lease/3: `serve` runs one before its first round, so a replica that finds the lease
    /// free leads from the start.
    pub async fn lease_attempt(&self) {
        self.lease_step(self.replica.renew_period()).await;
        self.update_available();
    }

    async fn lease_step(&self, period: Duration) {
        let started = Instant::now();
        let lease = self.replica.lease;
        let leading = self.with_role(|r| r.leading.clone());
        if let Some((t, until)) = leading {
            match tokio::time::timeout(period, self.store.renew_lease(&t, lease)).await {
                Ok(Ok(true)) => self.with_role(|r| {
                    r.last_db_ok = Some(started);
                    if let Some(l) = r.leading.as_mut() {
                        l.1 = started + lease;
                    }
                }),
                Ok(Ok(false)) => {
                    self.with_role(|r| r.last_db_ok = Some(started));
                    self.step_down("lease lost (expired or taken)");
                }
                res => {
                    let e = match res {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {} ms", period.as_millis()),
                    };
                    if self.replica.force {
                        // The only writer: its store is slow, not taken; the publish's fence
                        // still refuses an expired lease, which is then taken again.
                        warn!(error = %e, "renewing the lease failed; retrying");
                    } else if Instant::now() + period >= until {
                        warn!(error = %e, "could not renew the lease before it ends");
                        self.step_down("could not renew the lease");
                    } else {
                        warn!(error = %e, "renewing the lease failed; retrying");
                    }
                }
            }
            return;
        }
        let id = &self.replica.replica_id;
        let force = self.replica.force;
        match tokio::time::timeout(period, self.store.acquire_lease(id, lease, force)).await {
            Ok(Ok(Some(t))) => {
                if let Err(e) = self.become_leader(t.clone(), started).await {
                    // Not leading yet (the role is set after the load): give the lease back.
                    warn!(error = %e, "took the lease but could not load the latest generation");
                    let _ = tokio::time::timeout(period, self.store.release_lease(&t)).await;
                }
            }
            Ok(Ok(None)) => {
                self.with_role(|r| r.last_db_ok = Some(started));
                if let Ok(Ok(st)) = tokio::time::timeout(period, self.store.lease()).await {
                    self.seen_term(st.term);
                }
            }
            Ok(Err(e)) => debug!(error = %e, "lease attempt failed"),
            Err(_) => debug!("lease attempt: no answer"),
        }
    }

    /// A follower's round requests to the leader ([`Engine::trigger`]): sent one at a time,
    /// at most one per [`KICK_GAP`] (inputs arriving meanwhile ride on the pending one), until
    /// `shutdown`.
    async fn kick_leader(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = self.kick.notified() => {}
                _ = shutdown.changed() => return,
            }
            match tokio::time::timeout(self.replica.renew_period(), self.store.notify_round()).await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "asking the leader for a round failed"),
                Err(_) => debug!("asking the leader for a round timed out"),
            }
            tokio::time::sleep(KICK_GAP).await;
        }
    }

    /// The follower's delivery (PostgreSQL; returns at once on SQLite): LISTEN for new
    /// generations, load each, and catch up after every (re)connection, until `shutdown`.
    /// The leader listens too, for followers' round requests.
    pub async fn follow(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        {
            if self.store.generation_channel().is_none() {
                return;
            }
            let kicks = tokio::spawn(self.clone().kick_leader(shutdown.clone()));
            let _abort_kicks = AbortOnDrop(kicks);
            let lease = self.replica.lease;
            let retry = (lease / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
            loop {
                let connect = tokio::time::timeout(lease, self.store.listen_generations());
                let listener = tokio::select! {
                    r = connect => r,
                    _ = shutdown.changed() => return,
                };
                let mut listener = match listener {
                    Ok(Ok(Some(l))) => l,
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => {
                        debug!(error = %e, "generation listener: connect failed");
                        self.listener_down();
                        tokio::select! {
                            () = tokio::time::sleep(retry) => continue,
                            _ = shutdown.changed() => return,
                        }
                    }
                    Err(_) => {
                        self.listener_down();
                        continue;
                    }
                };
                // Catch up on what was published while not listening.
                match tokio::time::timeout(lease, self.catch_up()).await {
                    Ok(Ok(())) => {}
                    _ => {
                        self.listener_down();
                        continue;
                    }
                }
                let _ = self.refresh_peers().await;
                let was_down = self.with_role(|r| r.listener_down_since.take().is_some());
                if was_down {
                    info!("generation listener connected; caught up");
                }
                self.update_available();
                loop {
                    let next = tokio::select! {
                        r = listener.recv() => r,
                        _ = shutdown.changed() => return,
                    };
                    match next {
                        Ok(Some(Notice::Round)) => {
                            if self.leading().is_some() {
                                self.trigger_local();
                            }
                        }
                        Ok(Some(Notice::Generation(g))) => {
                            if let Err(e) = self.load_generation(g).await {
                                warn!(error = %e, generation = g, "loading a notified generation failed");
                            }
                            if let Err(e) = self.refresh_peers().await {
                                debug!(error = %e, "refreshing peers failed");
                            }
                        }
                        Ok(None) | Err(_) => {
                            warn!("generation listener disconnected; reconnecting");
                            self.listener_down();
                            break;
                        }
                    }
                }
            }
        }
    }

    fn listener_down(&self) {
        self.with_role(|r| {
            r.listener_down_since.get_or_insert_with(Instant::now);
        });
    }
}
