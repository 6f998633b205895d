//! The one place errors become gRPC statuses, and statuses become errors again.
//!
//! A [`Fatal`] error is bad input (missing table, non-empty target, wrong schema): retrying
//! cannot help, so it travels as FAILED_PRECONDITION and the job stops with its message. Anything
//! else is treated as transient and retried.

use std::fmt;

/// Bad input that no retry can fix. Its message is the operator-facing line.
#[derive(Debug)]
pub struct Fatal(pub String);

impl fmt::Display for Fatal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Fatal {}

/// Make a fatal error.
pub fn fatal(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Fatal(msg.into()))
}

/// The fatal message inside an error chain, if any.
pub fn fatal_message(e: &anyhow::Error) -> Option<String> {
    e.chain()
        .find_map(|c| c.downcast_ref::<Fatal>())
        .map(|f| f.0.clone())
}

/// A resource the operator must free (a full spool disk): retried patiently, without using up
/// the chunk's attempts, and shown in the job's status meanwhile.
#[derive(Debug)]
pub struct Exhausted(pub String);

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Exhausted {}

pub fn exhausted(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Exhausted(msg.into()))
}

/// The exhausted-resource message inside an error chain, if any.
pub fn exhausted_message(e: &anyhow::Error) -> Option<String> {
    e.chain()
        .find_map(|c| c.downcast_ref::<Exhausted>())
        .map(|x| x.0.clone())
}

pub fn to_status(e: anyhow::Error) -> tonic::Status {
    if let Some(m) = fatal_message(&e) {
        return tonic::Status::failed_precondition(m);
    }
    if let Some(m) = exhausted_message(&e) {
        return tonic::Status::resource_exhausted(m);
    }
    tonic::Status::internal(format!("{e:#}"))
}

/// A status from a peer as an error; FAILED_PRECONDITION stays fatal.
pub fn from_status(s: tonic::Status, what: &str) -> anyhow::Error {
    if s.code() == tonic::Code::FailedPrecondition {
        fatal(s.message().to_string())
    } else if s.code() == tonic::Code::ResourceExhausted {
        exhausted(s.message().to_string())
    } else {
        anyhow::anyhow!("{what}: {} ({:?})", s.message(), s.code())
    }
}

impl Fatal {
    pub fn new(msg: impl fmt::Display) -> Self {
        Fatal(msg.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn fatal_survives_context_and_the_wire() {
        let e: anyhow::Result<()> = Err(fatal("target table public.t already holds rows"));
        let e = e.context("restore chunk 3").expect_err("is error");
        let s = to_status(e);
        assert_eq!(s.code(), tonic::Code::FailedPrecondition);
        let back = from_status(s, "push chunk");
        assert_eq!(
            fatal_message(&back).as_deref(),
            Some("target table public.t already holds rows")
        );
        let transient = to_status(anyhow::anyhow!("connection reset"));
        assert_eq!(transient.code(), tonic::Code::Internal);
    }
}
