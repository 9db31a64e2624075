//! gRPC's status table says RESOURCE_EXHAUSTED for a message larger than the receiver's
//! limit; tonic answers OUT_OF_RANGE ("decoded message length too large"). Both places the
//! status can appear are mapped: the headers of a trailers-only response (a unary request
//! refused before its handler, by [`layer`]) and a streaming handler's error
//! ([`map_status`], used by the Report stream).

use http::{HeaderValue, Response};
use tonic::{Code, Status};

/// tonic's message for a message over `max_decoding_message_size`.
const TOO_LARGE: &str = "message length too large";

fn is_oversize(code: Code, message: &str) -> bool {
    code == Code::OutOfRange && message.contains(TOO_LARGE)
}

/// The status a handler returns for `s`: RESOURCE_EXHAUSTED naming the limit for an
/// oversize message, `s` otherwise.
#[must_use]
pub fn map_status(s: Status) -> Status {
    if is_oversize(s.code(), s.message()) {
        Status::resource_exhausted(format!(
            "message larger than the broker's limit (--max-message-bytes): {}",
            s.message()
        ))
    } else {
        s
    }
}

/// Rewrites a trailers-only OUT_OF_RANGE "message length too large" into RESOURCE_EXHAUSTED.
pub fn rewrite<B>(mut resp: Response<B>) -> Response<B> {
    let h = resp.headers();
    let oversize = h.get("grpc-status").and_then(|v| v.to_str().ok()) == Some("11")
        && h.get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| m.contains("message%20length%20too%20large") || m.contains(TOO_LARGE));
    if oversize {
        resp.headers_mut()
            .insert("grpc-status", HeaderValue::from_static("8"));
    }
    resp
}

/// The tower layer applying [`rewrite`] to every response of the server.
#[must_use]
pub fn layer<B>() -> tower::util::MapResponseLayer<fn(Response<B>) -> Response<B>> {
    tower::util::MapResponseLayer::new(rewrite::<B> as fn(Response<B>) -> Response<B>)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_oversize_out_of_range_is_mapped() {
        let s = Status::out_of_range(
            "Error, decoded message length too large: found 5000000 bytes, the limit is: 4194304 bytes",
        );
        let m = map_status(s);
        assert_eq!(m.code(), Code::ResourceExhausted);
        assert!(
            m.message().contains("--max-message-bytes"),
            "{}",
            m.message()
        );
        assert_eq!(
            map_status(Status::out_of_range("other")).code(),
            Code::OutOfRange
        );
        assert_eq!(
            map_status(Status::invalid_argument("x")).code(),
            Code::InvalidArgument
        );
    }
}
