//! The wire only: generated prost messages and tonic services for `haul.v1`.
//!
//! Invariant: no domain logic lives here. Crates that own a concept convert at the edge.

#![allow(clippy::all, clippy::pedantic)]

pub mod v1 {
    tonic::include_proto!("haul.v1");
}

pub use v1::*;
