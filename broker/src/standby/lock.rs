//! The database lock: `flock(LOCK_EX)` on `<sqlite file>.lock`, holder's pid inside.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::StandbyError;

/// The SQLite file of a `sqlite:` URL; `None` for PostgreSQL and in-memory databases (no
/// file to share). Accepts `sqlite://PATH`, `sqlite:PATH`, with or without `?query`.
#[must_use]
pub fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path == ":memory:" || query.split('&').any(|kv| kv == "mode=memory") {
        return None;
    }
    Some(PathBuf::from(path))
}

/// The lock file of a SQLite database file: the same path with `.lock` appended.
#[must_use]
pub fn lock_path(db: &Path) -> PathBuf {
    let mut s = db.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// The held lock; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DbLock {
    path: PathBuf,
    _file: File,
}

/// What [`DbLock::try_acquire`] found.
#[derive(Debug)]
pub enum LockAttempt {
    /// The lock is ours.
    Acquired(DbLock),
    /// Another process holds it (its pid, when it wrote one).
    Held {
        holder: Option<u32>,
        waiter: LockWaiter,
    },
}

/// Waits for a held lock ([`LockWaiter::wait`]).
#[derive(Debug)]
pub struct LockWaiter {
    path: PathBuf,
    file: File,
}

fn flock(file: &File, nonblocking: bool) -> io::Result<bool> {
    let op = if nonblocking {
        libc::LOCK_EX | libc::LOCK_NB
    } else {
        libc::LOCK_EX
    };
    loop {
        #[allow(unsafe_code)]
        // SAFETY: flock on a valid, owned fd; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
        if rc == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => {}
            Some(libc::EWOULDBLOCK) if nonblocking => return Ok(false),
            _ => return Err(e),
        }
    }
}

fn read_pid(file: &mut File) -> Option<u32> {
    let mut s = String::new();
    file.rewind().ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

impl DbLock {
    /// Tries to take the lock of database file `db` without waiting.
    ///
    /// # Errors
    /// The lock file cannot be created or locked.
    pub fn try_acquire(db: &Path) -> Result<LockAttempt, StandbyError> {
        let path = lock_path(db);
        let err = |source| StandbyError::Lock {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err)?;
        if flock(&file, true).map_err(err)? {
            return Self::held(path, file).map(LockAttempt::Acquired);
        }
        let holder = read_pid(&mut file);
        Ok(LockAttempt::Held {
            holder,
            waiter: LockWaiter { path, file },
        })
    }

    fn held(path: PathBuf, mut file: File) -> Result<Self, StandbyError> {
        let err = |source| StandbyError::Lock {
            path: path.clone(),
            source,
        };
        file.set_len(0).map_err(err)?;
        file.rewind().map_err(err)?;
        writeln!(file, "{}", std::process::id()).map_err(err)?;
        Ok(Self { path, _file: file })
    }

    /// The lock file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl LockWaiter {
    /// The lock file.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Blocks (on a thread of its own, so the runtime keeps serving `/metrics`) until the
    /// lock is ours. Dropping the future leaves the thread blocked until the lock comes,
    /// then it releases it at once.
    ///
    /// # Errors
    /// `flock` failed.
    pub async fn wait(self) -> Result<DbLock, StandbyError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let path = self.path.clone();
        let spawned = std::thread::Builder::new()
            .name("db-lock-wait".into())
            .spawn(move || {
                let r = flock(&self.file, false).map(|_| self.file);
                let _ = tx.send(r);
            });
        if let Err(source) = spawned {
            return Err(StandbyError::Lock { path, source });
        }
        match rx.await {
            Ok(Ok(file)) => DbLock::held(path, file),
            Ok(Err(source)) => Err(StandbyError::Lock { path, source }),
            Err(_) => Err(StandbyError::LockThread { path }),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn sqlite_urls_name_their_file_and_others_none() {
        for (url, want) in [
            (
                "sqlite://ballast-broker.db?mode=rwc",
                Some("ballast-broker.db"),
            ),
            (
                "sqlite:///var/lib/ballast/b.db",
                Some("/var/lib/ballast/b.db"),
            ),
            ("sqlite:/tmp/x.db?mode=rwc&cache=shared", Some("/tmp/x.db")),
            ("sqlite::memory:", None),
            ("sqlite://:memory:", None),
            ("sqlite://x.db?mode=memory", None),
            ("postgres://u:p@localhost/db", None),
        ] {
            assert_eq!(sqlite_file(url), want.map(PathBuf::from), "{url}");
        }
        assert_eq!(
            lock_path(Path::new("/a/b.db")),
            PathBuf::from("/a/b.db.lock")
        );
    }

    #[tokio::test]
    async fn a_second_holder_waits_and_gets_the_lock_when_the_first_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("b.db");
        let LockAttempt::Acquired(first) = DbLock::try_acquire(&db).unwrap() else {
            panic!("the first attempt must get the lock");
        };
        let LockAttempt::Held { holder, waiter } = DbLock::try_acquire(&db).unwrap() else {
            panic!("the second attempt must find it held");
        };
        assert_eq!(holder, Some(std::process::id()));
        let waiting = tokio::spawn(waiter.wait());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "waits while the first holds it");
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(second.path(), lock_path(&db));
    }
}
