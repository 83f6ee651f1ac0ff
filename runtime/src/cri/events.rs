//! GetContainerEvents: a stream of container lifecycle changes, each with
//! the pod's status and its containers' statuses as they are when the
//! event is sent (what kubelet's evented PLEG reads).

use k8s_cri::v1::{ContainerEventResponse, ContainerEventType};
use std::pin::Pin;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::Status;

use super::container::cri_status;
use super::CriService;
use crate::container::{ContainerEvent, EventKind};

pub type EventStream =
    Pin<Box<dyn Stream<Item = Result<ContainerEventResponse, Status>> + Send + 'static>>;

fn event_type(kind: EventKind) -> ContainerEventType {
    match kind {
        EventKind::Created => ContainerEventType::ContainerCreatedEvent,
        EventKind::Started => ContainerEventType::ContainerStartedEvent,
        EventKind::Stopped => ContainerEventType::ContainerStoppedEvent,
        EventKind::Deleted => ContainerEventType::ContainerDeletedEvent,
    }
}

impl CriService {
    pub(super) fn container_events(&self) -> EventStream {
        let mut events = self.containers.subscribe();
        let this = self.clone();
        let mut shutdown = self.shutdown.subscribe();
        let stream = async_stream(move |tx| async move {
            loop {
                let received = tokio::select! {
                    e = events.recv() => e,
                    _ = shutdown.wait_for(|down| *down) => return,
                };
                let event = match received {
                    Ok(e) => e,
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!("a container event reader fell behind; {n} events dropped");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                };
                let response = this.event_response(event).await;
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Box::pin(stream)
    }

    async fn event_response(&self, event: ContainerEvent) -> ContainerEventResponse {
        let pod_sandbox_status = self
            .pod_sandbox_status(&event.sandbox_id, false)
            .await
            .ok()
            .and_then(|s| s.status);
        let containers_statuses = self
            .containers
            .list()
            .await
            .iter()
            .filter(|r| r.sandbox_id == event.sandbox_id)
            .map(cri_status)
            .collect();
        ContainerEventResponse {
            container_id: event.container_id,
            container_event_type: event_type(event.kind) as i32,
            created_at: event.at_ns,
            pod_sandbox_status,
            containers_statuses,
        }
    }
}

/// A stream fed by a task through a small channel (backpressure: a slow
/// reader makes the task wait, and the broadcast channel drops for it).
fn async_stream<T, F, Fut>(body: F) -> impl Stream<Item = T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(body(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
