//! bootbox's exit port (0x600, one byte): the guest writes its exit status and the run ends
//! with it. Lets the appliance return the job's status without an orderly shutdown.

use crate::devices::bus::BusDevice;
use crate::run_control::{GuestExit, RunControl};
use std::sync::Arc;

pub struct ExitPort {
    control: Arc<RunControl>,
}

impl ExitPort {
    pub fn new(control: Arc<RunControl>) -> Self {
        ExitPort { control }
    }
}

impl BusDevice for ExitPort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        if let Some(&status) = data.first() {
            self.control.finish(Ok(GuestExit::Status(status)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_status_wins() {
        let control = RunControl::new().unwrap();
        let port = ExitPort::new(control.clone());
        port.write(0, &[42]);
        port.write(0, &[7]);
        assert!(matches!(control.wait(), Ok(GuestExit::Status(42))));
    }
}
