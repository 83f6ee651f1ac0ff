//! Backend events, on the event loop: the backend's calls become guest interrupts (status
//! bit + irqfd, through [`VirtioInterrupt`]), and a hang-up of its socket breaks the device.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::device::{Fs, SOCKET_TOKEN};
use crate::devices::virtio::InterruptKind;

impl Fs {
    pub(super) fn handle_backend_events(&mut self) {
        let mut events = vec![EpollEvent::default(); self.calls.len() + 1];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("virtio-fs epoll: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                SOCKET_TOKEN => self.backend_hung_up(),
                q => self.forward_call(q as usize),
            }
        }
    }

    fn forward_call(&mut self, queue: usize) {
        let Some(call) = self.calls.get(queue) else {
            return;
        };
        if call.read().is_err() {
            return;
        }
        self.metrics.call_events.fetch_add(1, Ordering::Relaxed);
        if let Some(interrupt) = &self.interrupt {
            self.count_interrupt(interrupt.trigger(InterruptKind::UsedBuffer));
        }
    }

    fn count_interrupt(&self, res: std::io::Result<()>) {
        let counter = match res {
            Ok(()) => &self.metrics.interrupts,
            Err(_) => &self.metrics.interrupt_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn backend_hung_up(&mut self) {
        // Level-triggered: stop watching the socket or the hang-up would wake us forever.
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.conn.socket().as_raw_fd(),
            EpollEvent::new(EventSet::empty(), SOCKET_TOKEN),
        );
        self.metrics
            .backend_disconnects
            .fetch_add(1, Ordering::Relaxed);
        let why = if self.conn.timed_out() {
            "no answer in time"
        } else {
            "the connection was closed"
        };
        self.break_connection(&why);
        if let Some(interrupt) = self.interrupt.clone() {
            // DEVICE_NEEDS_RESET is now shown; tell the driver.
            self.count_interrupt(interrupt.trigger(InterruptKind::ConfigChange));
        }
    }
}
