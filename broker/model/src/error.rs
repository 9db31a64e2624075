//! The model's one error type: every variant names the field or the value that is wrong.

/// Everything that can make [`super::solve`] / [`super::explain`] refuse a problem.
///
/// Infeasible instances are *not* errors: they are solved with a stated fallback and
/// reported as [`super::Status::Degraded`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// A field holds a bad value; `path` names it (e.g. `services[0].demand_rps.c9`).
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    /// Weighted round-robin: a cost of 0 means "always this cluster", so two of them for one
    /// source leave no answer.
    #[error(
        "{path}: weighted-round-robin: source {source_cluster:?} has zero cost to both {first:?} \
         and {second:?} (a zero cost means \"always this cluster\", so only one may be zero)"
    )]
    AmbiguousZeroCost {
        path: String,
        source_cluster: String,
        first: String,
        second: String,
    },
    /// `explain` was asked about a service the problem does not have.
    #[error("services: no service named {0:?}")]
    UnknownService(String),
    /// `explain` was asked about a source that has no `demand_rps` entry for the service.
    #[error("services[{index}].demand_rps: {source_cluster:?} is not a source of {service:?}")]
    UnknownSource {
        index: usize,
        service: String,
        source_cluster: String,
    },
}

impl ModelError {
    pub(crate) fn invalid(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}
