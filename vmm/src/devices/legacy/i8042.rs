//! The i8042 keyboard controller, present only so that the guest can reset the CPU: Linux with
//! `reboot=k` writes 0xfe to port 0x64, which we turn into a clean VM exit.

use super::EventFdTrigger;
use crate::devices::BusDevice;

/// vm-superio's i8042 on the port-I/O bus at 0x60..=0x64.
pub struct I8042(vm_superio::I8042Device<EventFdTrigger>);

impl I8042 {
    /// A controller signalling `reset` on a CPU reset command.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self(vm_superio::I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.0.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 {
            let _ = self.0.write(offset as u8, data[0]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(EventFdTrigger::new(evt.try_clone().unwrap()));
        dev.write(4, &[0x01]);
        assert!(evt.read().is_err());
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
