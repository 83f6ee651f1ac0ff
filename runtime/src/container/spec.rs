//! Placeholder until the OCI spec builder lands (in progress on branch
//! `spec`): every container creation fails with a clear error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestMount {
    pub container_path: String,
    pub guest_source: String,
    pub readonly: bool,
    pub propagation: i32,
}
#[derive(Debug, Clone, Default)]
pub struct SandboxFiles {
    pub hostname: String,
    pub resolv_conf: String,
    pub hosts: String,
}
pub struct SpecInput<'a> {
    pub container_id: &'a str,
    pub config: &'a k8s_cri::v1::ContainerConfig,
    pub image: &'a crate::image::manifest::ImageConfig,
    pub root_path: String,
    pub mounts: Vec<GuestMount>,
    pub sandbox_files: SandboxFiles,
}
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{0}")]
    Invalid(String),
}
pub fn agent_request(
    input: &SpecInput,
) -> Result<carapace_agent_api::v1::CreateContainerRequest, SpecError> {
    Err(SpecError::Invalid(format!(
        "container {}: building OCI specs from CRI configs is not implemented yet",
        input.container_id
    )))
}
