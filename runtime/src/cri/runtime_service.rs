//! The RuntimeService trait: each call delegates to its own module through
//! the [`rpc`] wrapper. Calls not implemented yet answer `Unimplemented`
//! with the call's name.

use std::pin::Pin;

use k8s_cri::v1::runtime_service_server::RuntimeService;
use k8s_cri::v1::{
    AttachRequest, AttachResponse, CheckpointContainerRequest, CheckpointContainerResponse,
    ContainerEventResponse, ContainerStatsRequest, ContainerStatsResponse, ContainerStatusRequest,
    ContainerStatusResponse, CreateContainerRequest, CreateContainerResponse, ExecRequest,
    ExecResponse, ExecSyncRequest, ExecSyncResponse, GetEventsRequest, ListContainerStatsRequest,
    ListContainerStatsResponse, ListContainersRequest, ListContainersResponse,
    ListMetricDescriptorsRequest, ListMetricDescriptorsResponse, ListPodSandboxMetricsRequest,
    ListPodSandboxMetricsResponse, ListPodSandboxRequest, ListPodSandboxResponse,
    ListPodSandboxStatsRequest, ListPodSandboxStatsResponse, PodSandboxStatsRequest,
    PodSandboxStatsResponse, PodSandboxStatusRequest, PodSandboxStatusResponse, PortForwardRequest,
    PortForwardResponse, RemoveContainerRequest, RemoveContainerResponse, RemovePodSandboxRequest,
    RemovePodSandboxResponse, ReopenContainerLogRequest, ReopenContainerLogResponse,
    RunPodSandboxRequest, RunPodSandboxResponse, RuntimeConfigRequest, RuntimeConfigResponse,
    StartContainerRequest, StartContainerResponse, StatusRequest, StatusResponse,
    StopContainerRequest, StopContainerResponse, StopPodSandboxRequest, StopPodSandboxResponse,
    UpdateContainerResourcesRequest, UpdateContainerResourcesResponse, UpdateRuntimeConfigRequest,
    UpdateRuntimeConfigResponse, VersionRequest, VersionResponse,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{rpc, CriError, CriService};

#[tonic::async_trait]
impl RuntimeService for CriService {
    type GetContainerEventsStream =
        Pin<Box<dyn Stream<Item = Result<ContainerEventResponse, Status>> + Send + 'static>>;

    async fn version(
        &self,
        _request: Request<VersionRequest>,
    ) -> Result<Response<VersionResponse>, Status> {
        rpc("Version", async { self.version() }).await
    }

    async fn run_pod_sandbox(
        &self,
        request: Request<RunPodSandboxRequest>,
    ) -> Result<Response<RunPodSandboxResponse>, Status> {
        rpc("RunPodSandbox", self.run_pod_sandbox(request.into_inner())).await
    }

    async fn stop_pod_sandbox(
        &self,
        request: Request<StopPodSandboxRequest>,
    ) -> Result<Response<StopPodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        rpc("StopPodSandbox", async {
            self.stop_pod_sandbox(&id).await?;
            Ok(StopPodSandboxResponse {})
        })
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        request: Request<RemovePodSandboxRequest>,
    ) -> Result<Response<RemovePodSandboxResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        rpc("RemovePodSandbox", async {
            self.remove_pod_sandbox(&id).await?;
            Ok(RemovePodSandboxResponse {})
        })
        .await
    }

    async fn pod_sandbox_status(
        &self,
        request: Request<PodSandboxStatusRequest>,
    ) -> Result<Response<PodSandboxStatusResponse>, Status> {
        let request = request.into_inner();
        rpc(
            "PodSandboxStatus",
            self.pod_sandbox_status(&request.pod_sandbox_id, request.verbose),
        )
        .await
    }

    async fn list_pod_sandbox(
        &self,
        request: Request<ListPodSandboxRequest>,
    ) -> Result<Response<ListPodSandboxResponse>, Status> {
        rpc(
            "ListPodSandbox",
            self.list_pod_sandbox(request.into_inner().filter),
        )
        .await
    }

    async fn create_container(
        &self,
        _request: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        rpc("CreateContainer", async {
            Err(CriError::Unimplemented("CreateContainer"))
        })
        .await
    }

    async fn start_container(
        &self,
        _request: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        rpc("StartContainer", async {
            Err(CriError::Unimplemented("StartContainer"))
        })
        .await
    }

    async fn stop_container(
        &self,
        _request: Request<StopContainerRequest>,
    ) -> Result<Response<StopContainerResponse>, Status> {
        rpc("StopContainer", async {
            Err(CriError::Unimplemented("StopContainer"))
        })
        .await
    }

    async fn remove_container(
        &self,
        _request: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerResponse>, Status> {
        rpc("RemoveContainer", async {
            Err(CriError::Unimplemented("RemoveContainer"))
        })
        .await
    }

    async fn list_containers(
        &self,
        _request: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        rpc("ListContainers", async {
            Err(CriError::Unimplemented("ListContainers"))
        })
        .await
    }

    async fn container_status(
        &self,
        _request: Request<ContainerStatusRequest>,
    ) -> Result<Response<ContainerStatusResponse>, Status> {
        rpc("ContainerStatus", async {
            Err(CriError::Unimplemented("ContainerStatus"))
        })
        .await
    }

    async fn update_container_resources(
        &self,
        _request: Request<UpdateContainerResourcesRequest>,
    ) -> Result<Response<UpdateContainerResourcesResponse>, Status> {
        rpc("UpdateContainerResources", async {
            Err(CriError::Unimplemented("UpdateContainerResources"))
        })
        .await
    }

    async fn reopen_container_log(
        &self,
        _request: Request<ReopenContainerLogRequest>,
    ) -> Result<Response<ReopenContainerLogResponse>, Status> {
        rpc("ReopenContainerLog", async {
            Err(CriError::Unimplemented("ReopenContainerLog"))
        })
        .await
    }

    async fn exec_sync(
        &self,
        _request: Request<ExecSyncRequest>,
    ) -> Result<Response<ExecSyncResponse>, Status> {
        rpc("ExecSync", async {
            Err(CriError::Unimplemented("ExecSync"))
        })
        .await
    }

    async fn exec(&self, _request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        rpc("Exec", async { Err(CriError::Unimplemented("Exec")) }).await
    }

    async fn attach(
        &self,
        _request: Request<AttachRequest>,
    ) -> Result<Response<AttachResponse>, Status> {
        rpc("Attach", async { Err(CriError::Unimplemented("Attach")) }).await
    }

    async fn port_forward(
        &self,
        _request: Request<PortForwardRequest>,
    ) -> Result<Response<PortForwardResponse>, Status> {
        rpc("PortForward", async {
            Err(CriError::Unimplemented("PortForward"))
        })
        .await
    }

    async fn container_stats(
        &self,
        _request: Request<ContainerStatsRequest>,
    ) -> Result<Response<ContainerStatsResponse>, Status> {
        rpc("ContainerStats", async {
            Err(CriError::Unimplemented("ContainerStats"))
        })
        .await
    }

    async fn list_container_stats(
        &self,
        _request: Request<ListContainerStatsRequest>,
    ) -> Result<Response<ListContainerStatsResponse>, Status> {
        rpc("ListContainerStats", async {
            Err(CriError::Unimplemented("ListContainerStats"))
        })
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        _request: Request<PodSandboxStatsRequest>,
    ) -> Result<Response<PodSandboxStatsResponse>, Status> {
        rpc("PodSandboxStats", async {
            Err(CriError::Unimplemented("PodSandboxStats"))
        })
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        _request: Request<ListPodSandboxStatsRequest>,
    ) -> Result<Response<ListPodSandboxStatsResponse>, Status> {
        rpc("ListPodSandboxStats", async {
            Err(CriError::Unimplemented("ListPodSandboxStats"))
        })
        .await
    }

    async fn update_runtime_config(
        &self,
        _request: Request<UpdateRuntimeConfigRequest>,
    ) -> Result<Response<UpdateRuntimeConfigResponse>, Status> {
        rpc("UpdateRuntimeConfig", async {
            Err(CriError::Unimplemented("UpdateRuntimeConfig"))
        })
        .await
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let verbose = request.into_inner().verbose;
        rpc("Status", async { self.status(verbose) }).await
    }

    async fn checkpoint_container(
        &self,
        _request: Request<CheckpointContainerRequest>,
    ) -> Result<Response<CheckpointContainerResponse>, Status> {
        rpc("CheckpointContainer", async {
            Err(CriError::Unimplemented("CheckpointContainer"))
        })
        .await
    }

    async fn get_container_events(
        &self,
        _request: Request<GetEventsRequest>,
    ) -> Result<Response<Self::GetContainerEventsStream>, Status> {
        rpc("GetContainerEvents", async {
            Err::<Self::GetContainerEventsStream, _>(CriError::Unimplemented("GetContainerEvents"))
        })
        .await
    }

    async fn list_metric_descriptors(
        &self,
        _request: Request<ListMetricDescriptorsRequest>,
    ) -> Result<Response<ListMetricDescriptorsResponse>, Status> {
        rpc("ListMetricDescriptors", async {
            Err(CriError::Unimplemented("ListMetricDescriptors"))
        })
        .await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<ListPodSandboxMetricsRequest>,
    ) -> Result<Response<ListPodSandboxMetricsResponse>, Status> {
        rpc("ListPodSandboxMetrics", async {
            Err(CriError::Unimplemented("ListPodSandboxMetrics"))
        })
        .await
    }

    async fn runtime_config(
        &self,
        _request: Request<RuntimeConfigRequest>,
    ) -> Result<Response<RuntimeConfigResponse>, Status> {
        rpc("RuntimeConfig", async { self.runtime_config() }).await
    }
}
