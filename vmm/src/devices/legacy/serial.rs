//! COM1: vm-superio's 8250 UART on the port-I/O bus; output to a file, stdout or nowhere.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::NoEvents;

use super::EventFdTrigger;
use crate::devices::BusDevice;

/// Errors from the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The console output file cannot be opened.
    #[error("cannot open serial output {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Bytes written by the guest to the console, and write errors on the host side.
#[derive(Debug, Default)]
pub struct SerialMetrics {
    /// Bytes the guest wrote.
    pub tx_bytes: AtomicU64,
    /// Failed host writes.
    pub errors: AtomicU64,
}

/// The UART on the bus.
pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
    metrics: Arc<SerialMetrics>,
}

impl Serial {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: vm_superio::Serial::new(irq, out),
            metrics: Arc::default(),
        }
    }

    /// Its counters.
    pub fn metrics(&self) -> Arc<SerialMetrics> {
        self.metrics.clone()
    }

    /// Flushes the output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= 8 {
            return;
        }
        // Offset 0 with DLAB clear is the transmit register: count what the guest sends.
        let before = self.metrics.tx_bytes.load(Ordering::Relaxed);
        match self.uart.write(offset as u8, data[0]) {
            Ok(()) => {
                if offset == 0 {
                    self.metrics.tx_bytes.store(before + 1, Ordering::Relaxed);
                }
            }
            Err(_) => {
                self.metrics.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmit_register_reaches_output() {
        let sink = Sink::default();
        let irq = EventFdTrigger::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let mut s = Serial::new(irq, Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        // Line status register says the transmitter is empty.
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        assert_eq!(s.metrics().tx_bytes.load(Ordering::Relaxed), 3);
    }
}
