//! The one error type of the lab library.

use std::path::PathBuf;

/// Everything the lab can fail with; each variant names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A file or system call failed; `context` says on what.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// An external command (`ip`, `sysctl`, a ballast binary) exited non-zero.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        cmd: String,
        status: String,
        stderr: String,
    },
    /// A call to the broker's Admin gRPC service failed (connection or status).
    #[error("broker Admin API ({call}): {reason}")]
    Admin { call: &'static str, reason: String },
    /// A user input (flag, argument, file field) is invalid.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The lab is not up (no state file).
    #[error("the lab `{prefix}` is not up (no state in {}); run `ballast-lab up` first", dir.display())]
    NotUp { prefix: String, dir: PathBuf },
    /// A state or config file could not be parsed.
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Something the lab waited for did not happen in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// Anything else, with a message that says what.
    #[error("{0}")]
    Other(String),
}

impl LabError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        LabError::Io {
            context: context.into(),
            source,
        }
    }
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        LabError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;

/// `.ctx("what")` on io results.
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| LabError::io(context(), e))
    }
}
