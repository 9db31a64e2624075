//! What the benches share.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Instant;

/// Median and p99 in µs of `n` connect()+accept() round trips to `to`, served by `l` (the
/// first 10 % more warm up and are not counted).
#[allow(clippy::unwrap_used, clippy::cast_precision_loss)]
pub fn connect_rtt(l: &TcpListener, to: SocketAddr, n: usize) -> (f64, f64) {
    let mut t = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let start = Instant::now();
        let c = TcpStream::connect(to).unwrap();
        let (s, _) = l.accept().unwrap();
        let el = start.elapsed();
        ballast_bpf::sys::linger_zero(&c);
        ballast_bpf::sys::linger_zero(&s);
        drop(c);
        drop(s);
        if i >= n / 10 {
            t.push(el.as_nanos() as f64 / 1000.0);
        }
    }
    t.sort_by(f64::total_cmp);
    (t[t.len() / 2], t[t.len() * 99 / 100])
}
