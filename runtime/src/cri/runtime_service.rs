//! The RuntimeService trait: each call delegates to its own module through
//! the [`rpc`] wrapper. The call not implemented yet (checkpoints) answers
//! `Unimplemented` with the call's name.

use k8s_cri::v1::runtime_service_server::RuntimeService;
use k8s_cri::v1::{
    AttachRequest, AttachResponse, CheckpointContainerRequest, CheckpointContainerResponse,
    ContainerStatsRequest, ContainerStatsResponse, ContainerStatusRequest, ContainerStatusResponse,
    CreateContainerRequest, CreateContainerResponse, ExecRequest, ExecResponse, ExecSyncRequest,
    ExecSyncResponse, GetEventsRequest, ListContainerStatsRequest, ListContainerStatsResponse,
    ListContainersRequest, ListContainersResponse, ListMetricDescriptorsRequest,
    ListMetricDescriptorsResponse, ListPodSandboxMetricsRequest, ListPodSandboxMetricsResponse,
    ListPodSandboxRequest, ListPodSandboxResponse, ListPodSandboxStatsRequest,
    ListPodSandboxStatsResponse, PodSandboxStatsRequest, PodSandboxStatsResponse,
    PodSandboxStatusRequest, PodSandboxStatusResponse, PortForwardRequest, PortForwardResponse,
    RemoveContainerRequest, RemoveContainerResponse, RemovePodSandboxRequest,
    RemovePodSandboxResponse, ReopenContainerLogRequest, ReopenContainerLogResponse,
    RunPodSandboxRequest, RunPodSandboxResponse, RuntimeConfigRequest, RuntimeConfigResponse,
    StartContainerRequest, StartContainerResponse, StatusRequest, StatusResponse,
    StopContainerRequest, StopContainerResponse, StopPodSandboxRequest, StopPodSandboxResponse,
    UpdateContainerResourcesRequest, UpdateContainerResourcesResponse, UpdateRuntimeConfigRequest,
    UpdateRuntimeConfigResponse, VersionRequest, VersionResponse,
};
use tonic::{Request, Response, Status};

use super::{rpc, CriError, CriService};

#[tonic::async_trait]
impl RuntimeService for CriService {
    type GetContainerEventsStream = super::events::EventStream;

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
        request: Request<CreateContainerRequest>,
    ) -> Result<Response<CreateContainerResponse>, Status> {
        rpc("CreateContainer", async {
            let pod_sandbox_id = self.create_container(request.into_inner()).await?;
            Ok(CreateContainerResponse {
                container_id: pod_sandbox_id,
            })
        })
        .await
    }

    async fn start_container(
        &self,
        request: Request<StartContainerRequest>,
    ) -> Result<Response<StartContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        rpc("StartContainer", async {
            self.start_container(&id).await?;
            Ok(StartContainerResponse {})
        })
        .await
    }

    async fn stop_container(
        &self,
        request: Request<StopContainerRequest>,
    ) -> Result<Response<StopContainerResponse>, Status> {
        let r = request.into_inner();
        rpc("StopContainer", async {
            self.stop_container(&r.container_id, r.timeout).await?;
            Ok(StopContainerResponse {})
        })
        .await
    }

    async fn remove_container(
        &self,
        request: Request<RemoveContainerRequest>,
    ) -> Result<Response<RemoveContainerResponse>, Status> {
        let id = request.into_inner().container_id;
        rpc("RemoveContainer", async {
            self.remove_container(&id).await?;
            Ok(RemoveContainerResponse {})
        })
        .await
    }

    async fn list_containers(
        &self,
        request: Request<ListContainersRequest>,
    ) -> Result<Response<ListContainersResponse>, Status> {
        rpc(
            "ListContainers",
            self.list_containers(request.into_inner().filter),
        )
        .await
    }

    async fn container_status(
        &self,
        request: Request<ContainerStatusRequest>,
    ) -> Result<Response<ContainerStatusResponse>, Status> {
        let r = request.into_inner();
        rpc(
            "ContainerStatus",
            self.container_status(&r.container_id, r.verbose),
        )
        .await
    }

    async fn update_container_resources(
        &self,
        request: Request<UpdateContainerResourcesRequest>,
    ) -> Result<Response<UpdateContainerResourcesResponse>, Status> {
        let r = request.into_inner();
        rpc("UpdateContainerResources", async {
            self.update_container_resources(&r.container_id, r.linux)
                .await?;
            Ok(UpdateContainerResourcesResponse {})
        })
        .await
    }

    async fn reopen_container_log(
        &self,
        request: Request<ReopenContainerLogRequest>,
    ) -> Result<Response<ReopenContainerLogResponse>, Status> {
        let id = request.into_inner().container_id;
        rpc("ReopenContainerLog", async {
            self.reopen_container_log(&id).await?;
            Ok(ReopenContainerLogResponse {})
        })
        .await
    }

    async fn exec_sync(
        &self,
        request: Request<ExecSyncRequest>,
    ) -> Result<Response<ExecSyncResponse>, Status> {
        let r = request.into_inner();
        rpc(
            "ExecSync",
            self.exec_sync(&r.container_id, &r.cmd, r.timeout),
        )
        .await
    }

    async fn exec(&self, request: Request<ExecRequest>) -> Result<Response<ExecResponse>, Status> {
        rpc("Exec", self.exec(request.into_inner())).await
    }

    async fn attach(
        &self,
        request: Request<AttachRequest>,
    ) -> Result<Response<AttachResponse>, Status> {
        rpc("Attach", self.attach(request.into_inner())).await
    }

    async fn port_forward(
        &self,
        request: Request<PortForwardRequest>,
    ) -> Result<Response<PortForwardResponse>, Status> {
        rpc("PortForward", self.port_forward(request.into_inner())).await
    }

    async fn container_stats(
        &self,
        request: Request<ContainerStatsRequest>,
    ) -> Result<Response<ContainerStatsResponse>, Status> {
        let id = request.into_inner().container_id;
        rpc("ContainerStats", async {
            Ok(ContainerStatsResponse {
                stats: Some(self.container_stats(&id).await?),
            })
        })
        .await
    }

    async fn list_container_stats(
        &self,
        request: Request<ListContainerStatsRequest>,
    ) -> Result<Response<ListContainerStatsResponse>, Status> {
        let filter = request.into_inner().filter;
        rpc("ListContainerStats", async {
            Ok(ListContainerStatsResponse {
                stats: self.list_container_stats(filter).await?,
            })
        })
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        request: Request<PodSandboxStatsRequest>,
    ) -> Result<Response<PodSandboxStatsResponse>, Status> {
        let id = request.into_inner().pod_sandbox_id;
        rpc("PodSandboxStats", async {
            Ok(PodSandboxStatsResponse {
                stats: Some(self.pod_sandbox_stats(&id).await?),
            })
        })
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        request: Request<ListPodSandboxStatsRequest>,
    ) -> Result<Response<ListPodSandboxStatsResponse>, Status> {
        let filter = request.into_inner().filter;
        rpc("ListPodSandboxStats", async {
            Ok(ListPodSandboxStatsResponse {
                stats: self.list_pod_sandbox_stats(filter).await?,
            })
        })
        .await
    }

    async fn update_runtime_config(
        &self,
        request: Request<UpdateRuntimeConfigRequest>,
    ) -> Result<Response<UpdateRuntimeConfigResponse>, Status> {
        let request = request.into_inner();
        rpc("UpdateRuntimeConfig", async {
            self.update_runtime_config(request)
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
        rpc("GetContainerEvents", async { Ok(self.container_events()) }).await
    }

    async fn list_metric_descriptors(
        &self,
        _request: Request<ListMetricDescriptorsRequest>,
    ) -> Result<Response<ListMetricDescriptorsResponse>, Status> {
        rpc("ListMetricDescriptors", async {
            Ok(ListMetricDescriptorsResponse {
                descriptors: super::metrics::descriptors(),
            })
        })
        .await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _request: Request<ListPodSandboxMetricsRequest>,
    ) -> Result<Response<ListPodSandboxMetricsResponse>, Status> {
        rpc("ListPodSandboxMetrics", async {
            Ok(ListPodSandboxMetricsResponse {
                pod_metrics: self.list_pod_sandbox_metrics().await,
            })
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
