//! The image store: pulling, storing and unpacking OCI images.
//!
//! Entry points for the rest of the runtime:
//! - [`store::ImageStore::open`]: the store on disk, records reloaded;
//! - [`pull::Puller::pull`]: pull from a registry (mirrors, auth, single-flight);
//! - [`import::import_layout`]: import an OCI layout directory or tar;
//! - [`store::ImageStore::resolve`]: image → config and unpacked layer dirs;
//! - [`rootfs::prepare`] / [`rootfs::teardown`]: a container's overlay root.

pub mod blobs;
pub mod digest;
mod fsutil;
pub mod identity_token;
pub mod import;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod registry;
pub mod rootfs;
pub mod store;
pub mod unpack;

pub use crate::cri::image_service::CriImageService;
pub use digest::Digest;
pub use reference::ImageRef;
pub use store::{ImageRecord, ImageStore, ResolvedImage};

#[cfg(test)]
mod testutil;
