//! Test support (feature `testing`): the database of a test — SQLite in a temp dir or
//! PostgreSQL in a fresh schema of `BALLAST_TEST_PG_URL` ([`PgSchema`]) — the
//! [`on_both_backends!`](crate::on_both_backends) macro that runs one scenario on each, and
//! record builders. Shared by this crate's tests and the broker's.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::Connection;

use crate::{
    AgentRecord, CapacityRecord, ClusterRecord, ReportRecord, RpsRecord, RttRecord,
    SolverRunRecord, Store, WeightRecord,
};

pub use tempfile;

/// Runs `scenario(url)` as two tests: `sqlite` on a file in a temp dir, `postgres` in a fresh
/// schema (skipped with a printed reason when `BALLAST_TEST_PG_URL` is unset).
#[macro_export]
macro_rules! on_both_backends {
    ($scenario:ident: $sqlite:ident, $postgres:ident) => {
        #[tokio::test]
        async fn $sqlite() {
            let dir = $crate::testing::tempfile::tempdir().unwrap();
            $scenario(&$crate::sqlite_url(&dir.path().join("b.db"))).await;
        }

        #[tokio::test]
        async fn $postgres() {
            let Some(pg) = $crate::testing::PgSchema::create(stringify!($postgres)).await else {
                return;
            };
            $scenario(&pg.url).await;
            pg.drop_schema().await;
        }
    };
}

/// A PostgreSQL database URL isolated in a fresh schema, or `None` (with a printed reason)
/// when `BALLAST_TEST_PG_URL` is unset (a failure instead under `CI=true`).
pub struct PgSchema {
    pub url: String,
    base: String,
    schema: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl PgSchema {
    pub async fn create(test: &str) -> Option<Self> {
        let Ok(base) = std::env::var("BALLAST_TEST_PG_URL") else {
            // CI's test command starts PostgreSQL: there a skip would hide a broken set-up.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but BALLAST_TEST_PG_URL is unset: {test} must run against PostgreSQL"
            );
            println!(
                "SKIP {test}: BALLAST_TEST_PG_URL is unset (bash kind-tests/postgres.sh prints it)"
            );
            return None;
        };
        let schema = format!(
            "t_{}_{}_{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        );
        let mut c = sqlx::PgConnection::connect(&base)
            .await
            .unwrap_or_else(|e| panic!("connect to BALLAST_TEST_PG_URL={base:?}: {e:?}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        Some(Self {
            url: format!("{base}{sep}options[search_path]={schema}"),
            base,
            schema,
        })
    }

    pub async fn drop_schema(self) {
        let mut c = sqlx::PgConnection::connect(&self.base).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA {} CASCADE",
            self.schema
        )))
        .execute(&mut c)
        .await
        .unwrap();
        c.close().await.unwrap();
    }
}

/// A cluster in `region` (zone `<region>a`, aws, gateway 127.0.0.1, registered at 1).
pub fn cluster(id: &str, region: &str) -> ClusterRecord {
    ClusterRecord {
        cluster_id: id.into(),
        region: region.into(),
        zone: format!("{region}a"),
        provider: "aws".into(),
        gateway_address: "127.0.0.1".into(),
        registered_at_ms: 1,
        updated_at_ms: 1,
    }
}

/// Node `node` of cluster `c`, never reported.
pub fn agent(c: &str, node: &str) -> AgentRecord {
    AgentRecord {
        cluster_id: c.into(),
        node_name: node.into(),
        agent_version: "v1".into(),
        registered_at_ms: 1,
        last_report_ms: 0,
        acked_generation: 0,
    }
}

/// Solver run `id` that produced `generation`.
pub fn run(id: i64, generation: i64) -> SolverRunRecord {
    SolverRunRecord {
        id,
        started_at_ms: 10,
        inputs_digest: format!("d{id}"),
        status: "optimal".into(),
        objective: 1.5,
        duration_ms: 0.25,
        services: 1,
        generation,
        detail: String::new(),
    }
}

/// One optimal weight row.
pub fn weight(svc: &str, src: &str, dst: &str, w: f64) -> WeightRecord {
    WeightRecord {
        service: svc.into(),
        src: src.into(),
        dst: dst.into(),
        weight: w,
        status: "optimal".into(),
        reason: String::new(),
        policy: "optimized".into(),
        params: "mixed".into(),
        computed_at_ms: 5,
    }
}

/// The agent record of node n1 of c1.
///
/// # Panics
/// When there is none.
pub async fn c1_n1(store: &Store) -> AgentRecord {
    store
        .agents()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.cluster_id == "c1" && a.node_name == "n1")
        .unwrap()
}

/// A report of node `node` of `c` at `at`: RTT to `(peer, ms)`, RPS `(service, dst, rps)`,
/// capacity `(service, rps)`, every sample measured at `at`; no import declaration.
pub fn report_of(
    c: &str,
    node: &str,
    at: i64,
    rtt: &[(&str, f64)],
    rps: &[(&str, &str, f64)],
    cap: &[(&str, f64)],
) -> ReportRecord {
    ReportRecord {
        cluster_id: c.into(),
        node_name: node.into(),
        received_at_ms: at,
        rtt: rtt
            .iter()
            .map(|(d, v)| RttRecord {
                src: c.into(),
                dst: (*d).into(),
                node_name: node.into(),
                rtt_ms: *v,
                loss_ratio: 0.0,
                reachable: true,
                measured_at_ms: at,
            })
            .collect(),
        rps: rps
            .iter()
            .map(|(s, d, v)| RpsRecord {
                src: c.into(),
                service: (*s).into(),
                dst: (*d).into(),
                node_name: node.into(),
                rps: *v,
                measured_at_ms: at,
                bytes_sent_per_s: 0.0,
                bytes_received_per_s: 0.0,
            })
            .collect(),
        capacity: cap
            .iter()
            .map(|(s, v)| CapacityRecord {
                cluster_id: c.into(),
                service: (*s).into(),
                node_name: node.into(),
                capacity_rps: *v,
                measured_at_ms: at,
                service_base_ms: None,
                service_slope_ms_per_rps: None,
                measured_service_ms: None,
                load_unit: "connections".into(),
            })
            .collect(),
        imports: None,
        full_set: false,
        services_without_vip: Vec::new(),
    }
}

/// Takes the leader lease for replica `t` by force, for an hour: what a test publishes with.
pub async fn leader(store: &Store) -> crate::LeaderTerm {
    store
        .acquire_lease("t", std::time::Duration::from_secs(3600), true)
        .await
        .unwrap()
        .unwrap()
}
