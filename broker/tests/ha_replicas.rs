//! Broker replicas on one PostgreSQL schema, as real `ballast-broker serve` processes with
//! mTLS: one elected leader publishes, every replica serves watches; take-over after SIGKILL,
//! fencing after SIGSTOP/SIGCONT, and a replica cut off from the database (a TCP forwarder in
//! front of PostgreSQL that the test kills). Skipped with a printed reason when
//! `BALLAST_TEST_PG_URL` is unset.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::replicas::{
    agent_on, assert_sequence, assert_strictly_increasing, c1_report, capacities, certs, free_port,
    generations, leader_of, reporter, signal, wait_until, watcher, Forwarder, Replica, LEASE,
};
use support::{capacity_report, cluster_agent, rps, send_reports, watch_req, PgSchema};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_one_leader_takeover_after_sigkill() {
    let Some(pg) = PgSchema::create("three_replicas_one_leader_takeover_after_sigkill").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bundle = certs(dir.path());
    let mut rs: Vec<Replica> = ["r1", "r2", "r3"]
        .iter()
        .map(|id| Replica::spawn(dir.path(), &pg.url, id, &[]))
        .collect();
    for r in &rs {
        r.wait_ready().await;
    }
    // Exactly one leader, the others followers of its term.
    let (li, term) = leader_of(&rs.iter().collect::<Vec<_>>(), Duration::from_secs(10)).await;
    for (i, r) in rs.iter().enumerate() {
        let (s, b) = r.ready().await;
        assert_eq!(s, 200, "{b}");
        if i == li {
            assert_eq!(b, format!("ready: leader term {term}"));
            assert_eq!(r.metric("ballast_broker_leader").await, Some(1.0));
        } else {
            assert_eq!(
                b,
                format!("ready: follower (leader term {term})"),
                "{}",
                r.id
            );
            assert_eq!(r.metric("ballast_broker_leader").await, Some(0.0));
        }
    }
    capacities(&bundle, &rs[1], &rs[2]).await;
    let watchers = [
        watcher(&rs[0], &bundle).await,
        watcher(&rs[1], &bundle).await,
        watcher(&rs[2], &bundle).await,
    ];
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for r in &rs {
        clients.push(agent_on(r, &bundle, "c1").await);
    }
    let rep = reporter(clients, stop.clone());
    // Generations flow to every replica's watcher.
    for w in &watchers {
        wait_until(
            "every watcher sees 3 generations",
            Duration::from_secs(20),
            || w.lock().unwrap().generations.len() >= 3,
        )
        .await;
    }
    let before = generations(&pg.url).await;
    let last_before = before.last().unwrap().0;
    // SIGKILL the leader while the agents report.
    let killed_at = Instant::now();
    rs[li].kill();
    let rest: Vec<&Replica> = rs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != li)
        .map(|(_, r)| r)
        .collect();
    let (ni, new_term) = leader_of(&rest, Duration::from_secs(15)).await;
    let elected = killed_at.elapsed();
    assert!(new_term > term, "{new_term} > {term}");
    // ... and publishes under its term.
    let published = loop {
        let rows = generations(&pg.url).await;
        if rows.iter().any(|(_, t)| *t == new_term) {
            break killed_at.elapsed();
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "no publish by the new leader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "TAKEOVER: lease {:?}; new leader {} (term {new_term}) elected {:?} and published {:?} after SIGKILL",
        LEASE, rest[ni].id, elected, published
    );
    // Bound: the old lease's remainder (< LEASE) + one attempt period (LEASE/3) + a round.
    assert!(
        published < LEASE + LEASE / 3 + Duration::from_secs(2),
        "take-over took {published:?}"
    );
    assert_eq!(rest[ni].metric("ballast_broker_leader").await, Some(1.0));
    assert_eq!(
        rest[ni].metric("ballast_broker_term").await,
        Some(f64::from(i32::try_from(new_term).unwrap()))
    );
    assert!(rest[ni].metric("ballast_broker_leader_changes_total").await >= Some(1.0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let sent = rep.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows = generations(&pg.url).await;
    assert_sequence(&rows);
    let last = rows.last().unwrap().0;
    assert!(last > last_before, "{rows:?}");
    // Every surviving replica's watcher reaches the last generation, in order, without gaps
    // in what its replica published after the take-over beyond coalescing.
    for (i, w) in watchers.iter().enumerate() {
        if i == li {
            continue;
        }
        wait_until(
            "the watcher reaches the last generation",
            Duration::from_secs(10),
            || w.lock().unwrap().generations.last() == Some(&u64::try_from(last).unwrap()),
        )
        .await;
        let seen = w.lock().unwrap().clone();
        assert_strictly_increasing(&rs[i].id, &seen.generations);
        let after: Vec<u64> = seen
            .generations
            .iter()
            .copied()
            .filter(|g| *g > u64::try_from(last_before).unwrap())
            .collect();
        println!(
            "watcher on {}: {} generations in all, {} after the kill (of {} published after it)",
            rs[i].id,
            seen.generations.len(),
            after.len(),
            last - last_before
        );
    }
    println!(
        "reports accepted: {sent}; generations {:?}..{last}",
        rows.first()
    );
    drop(rs);
    pg.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_is_fenced_and_steps_down() {
    let Some(pg) = PgSchema::create("a_paused_leader_is_fenced_and_steps_down").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bundle = certs(dir.path());
    // A round with a new generation waits 3 s before publishing it, as a slow solve: the
    // leader is paused in that window, so that when it resumes its publish meets the fence.
    let env = [("BALLAST_TEST_SLOW_ROUND_MS", "3000")];
    let r1 = Replica::spawn(dir.path(), &pg.url, "r1", &env);
    r1.wait_ready().await;
    let (_, term) = leader_of(&[&r1], Duration::from_secs(10)).await;
    let r2 = Replica::spawn(dir.path(), &pg.url, "r2", &env);
    r2.wait_ready().await;
    let (s, b) = r2.ready().await;
    assert_eq!(
        (s, b.as_str()),
        (
            200,
            format!("ready: follower (leader term {term})").as_str()
        )
    );
    capacities(&bundle, &r2, &r2).await;
    let mut c1 = agent_on(&r1, &bundle, "c1").await;
    let watch2 = watcher(&r2, &bundle).await;
    // r1 publishes under its term first.
    let mut i = 0;
    loop {
        send_reports(&mut c1, vec![c1_report(i)]).await.unwrap();
        i += 1;
        if generations(&pg.url).await.iter().any(|(_, t)| *t == term) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // A report to the leader starts a round; pause the leader inside it (once its log says
    // the round waits before publishing), past its lease.
    let slow_rounds = || {
        std::fs::read_to_string(dir.path().join("r1.log"))
            .unwrap_or_default()
            .matches("test hook: slow round")
            .count()
    };
    // (A report does not always change the weights: damping may leave them where they are,
    // so reports go on until a round has something to publish.)
    let seen = slow_rounds();
    let deadline = Instant::now() + Duration::from_secs(20);
    'round: loop {
        send_reports(&mut c1, vec![c1_report(i)]).await.unwrap();
        i += 1;
        for _ in 0..25 {
            if slow_rounds() > seen {
                break 'round;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            Instant::now() < deadline,
            "r1 started no round that publishes"
        );
    }
    assert_eq!(signal(r1.pid(), libc::SIGSTOP), 0);
    let paused_at = Instant::now();
    let (_, new_term) = leader_of(&[&r2], Duration::from_secs(15)).await;
    assert!(new_term > term);
    println!(
        "r2 took over (term {new_term}) {:?} after r1 was paused",
        paused_at.elapsed()
    );
    // r2 publishes under its term (its own reports).
    let mut c1b = agent_on(&r2, &bundle, "c1").await;
    loop {
        send_reports(&mut c1b, vec![c1_report(i)]).await.unwrap();
        i += 1;
        let rows = generations(&pg.url).await;
        if rows.iter().any(|(_, t)| *t == new_term) {
            break;
        }
        assert!(
            paused_at.elapsed() < Duration::from_secs(20),
            "r2 never published"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A new service r1 never published: whatever r1's paused round read before, the store
    // now holds a change it will try to publish when it resumes.
    let mut c2 = agent_on(&r2, &bundle, "c2").await;
    let mut cap = capacity_report("c2", "ns/api", 500.0);
    cap.capacity.push(support::cap("ns/web", 1000.0));
    send_reports(&mut c2, vec![cap]).await.unwrap();
    let mut m = c1_report(i);
    m.rps.push(rps("ns/api", "c2", 10.0));
    send_reports(&mut c1b, vec![m]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = generations(&pg.url).await;
    // Resume r1: its round goes on to publish under its old term, and is fenced.
    assert_eq!(signal(r1.pid(), libc::SIGCONT), 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if r1.metric("ballast_broker_fenced_publishes_total").await == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "r1's publish was not fenced; r1's log:\n{}",
            std::fs::read_to_string(dir.path().join("r1.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (s, b) = r1.ready().await;
    assert_eq!(
        (s, b.clone()),
        (200, format!("ready: follower (leader term {new_term})")),
        "{b}"
    );
    assert_eq!(r1.metric("ballast_broker_leader").await, Some(0.0));
    let log = std::fs::read_to_string(dir.path().join("r1.log")).unwrap();
    assert!(log.contains("publish fenced"), "{log}");
    // Nothing published under the old term after the take-over; numbers never reused.
    let after = generations(&pg.url).await;
    assert_sequence(&after);
    assert_eq!(&after[..before.len()], &before[..]);
    assert!(
        after.iter().skip(before.len()).all(|(_, t)| *t == new_term),
        "{after:?}"
    );
    // r2's watcher saw r2's generations in order.
    let seen = watch2.lock().unwrap().clone();
    assert_strictly_increasing("r2", &seen.generations);
    println!("generations (generation, term): {after:?}");
    drop((r1, r2));
    pg.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_the_database_is_unavailable_then_recovers() {
    let Some(pg) =
        PgSchema::create("a_replica_cut_off_from_the_database_is_unavailable_then_recovers").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let bundle = certs(dir.path());
    // r3 reaches PostgreSQL through the forwarder.
    // host:port of the URL (postgres://user:pass@host:port/db...).
    let hostport = pg
        .url
        .split('@')
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let target: std::net::SocketAddr = hostport.parse().unwrap();
    let fport = free_port();
    let mut fwd = Forwarder::start(fport, target).await;
    let via = pg.url.replacen(&hostport, &format!("127.0.0.1:{fport}"), 1);
    let r1 = Replica::spawn(dir.path(), &pg.url, "r1", &[]);
    r1.wait_ready().await;
    leader_of(&[&r1], Duration::from_secs(10)).await;
    let r3 = Replica::spawn(dir.path(), &via, "r3", &[]);
    r3.wait_ready().await;
    capacities(&bundle, &r1, &r1).await;
    let w3 = watcher(&r3, &bundle).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rep = reporter(vec![agent_on(&r1, &bundle, "c1").await], stop.clone());
    wait_until(
        "r3's watcher gets generations",
        Duration::from_secs(20),
        || w3.lock().unwrap().generations.len() >= 2,
    )
    .await;
    // Cut r3 off the database.
    fwd.cut().await;
    let cut_at = Instant::now();
    // Not ready at once (its store probe fails), and partitioned after the lease.
    let (code, body) = loop {
        let (s, b) = r3.ready().await;
        assert!(
            s != 200 || cut_at.elapsed() < LEASE,
            "r3 ready after the lease: {b}"
        );
        if s == 503 && b.contains("partitioned") {
            break (s, b);
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(20),
            "r3 still ready: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "r3 not ready {:?} after the cut: {code} {body}",
        cut_at.elapsed()
    );
    assert!(body.contains("partitioned"), "{body}");
    assert!(
        cut_at.elapsed() >= LEASE,
        "unavailable before the lease: {:?}",
        cut_at.elapsed()
    );
    // Its weight stream ended with UNAVAILABLE, and a new one is refused.
    wait_until("r3's stream ends", Duration::from_secs(10), || {
        w3.lock().unwrap().ended.is_some()
    })
    .await;
    assert_eq!(w3.lock().unwrap().ended, Some(tonic::Code::Unavailable));
    let mut a3 = cluster_agent(r3.addr, &bundle, "c1").await;
    let e = a3.watch_weights(watch_req("c1", 0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // r1 keeps publishing meanwhile.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The database is back: r3 recovers on its own and serves the latest generation.
    let mut fwd2 = Forwarder::start(fport, target).await;
    let back_at = Instant::now();
    loop {
        let (s, b) = r3.ready().await;
        if s == 200 {
            println!(
                "r3 ready again {:?} after the database came back: {b}",
                back_at.elapsed()
            );
            assert!(b.starts_with("ready: follower (leader term "), "{b}");
            break;
        }
        assert!(
            back_at.elapsed() < Duration::from_secs(20),
            "r3 never recovered: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    rep.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let last = u64::try_from(generations(&pg.url).await.last().unwrap().0).unwrap();
    let w = watcher(&r3, &bundle).await;
    wait_until(
        "r3 serves the latest generation",
        Duration::from_secs(10),
        || w.lock().unwrap().generations.last() == Some(&last),
    )
    .await;
    fwd2.cut().await;
    drop(fwd);
    drop((r1, r3));
    pg.drop_schema().await;
}
