//! The image store: pulling, storing and unpacking OCI images.
