//! The Carapace runtime: a Kubernetes CRI runtime that runs every pod in its
//! own KVM microVM.

pub mod agent_client;
pub mod agent_ready;
pub mod config;
pub mod container;
pub mod cri;
pub mod demo;
pub mod host;
pub mod host_cgroup;
pub mod image;
pub mod network;
pub mod sandbox;
pub mod state;
pub mod streaming;
pub mod vm;
