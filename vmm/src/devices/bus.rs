//! Address-range dispatch for port I/O and MMIO exits.
//!
//! The buses are built before the vCPUs start and never change afterwards, so vCPU threads
//! share them without a lock; each device has its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty or overlaps another device.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length.
        len: u64,
    },
}

type Entry = (u64, Arc<Mutex<dyn BusDevice>>);

/// A set of non-overlapping address ranges, each served by a device.
#[derive(Default, Clone)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.devices.iter().map(|(b, (l, _))| (b, l)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `base..base+len`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let Some(end) = end else {
            return Err(BusError::Overlap { base, len });
        };
        let overlaps_prev = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(size as u64)? <= *len).then_some((offset, dev))
    }

    /// Dispatches a read; returns false (and leaves `data` alone) if nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false if nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo::default()));
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        assert!(bus.insert(dev.clone(), 0x3f0, 9).is_err());
        assert!(bus.insert(dev.clone(), 0x3ff, 1).is_err());
        assert!(bus.insert(dev.clone(), 0x400, 0).is_err());
        bus.insert(dev.clone(), 0x400, 1).unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x3fa, &mut b));
        assert_eq!(b[0], 2);
        assert!(!bus.read(0x3f7, &mut b));
        // An access straddling the end of a device is not dispatched.
        assert!(!bus.write(0x3ff, &[1, 2]));
        assert!(bus.write(0x3ff, &[9]));
        assert_eq!(dev.lock().unwrap().0, vec![(7, vec![9])]);
    }
}
