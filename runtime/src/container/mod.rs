//! Containers.

pub mod spec;
