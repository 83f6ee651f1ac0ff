//! The Carapace runtime: a Kubernetes CRI runtime that runs every pod in its
//! own KVM microVM.

pub mod agent_client;
pub mod config;
pub mod host;
pub mod image;
pub mod state;
pub mod vm;
