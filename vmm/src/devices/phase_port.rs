//! bootbox's phase port (0x610, one byte): the guest writes a phase id and the vCPU thread
//! timestamps it immediately, so boot and job phases can be measured from the host.

use crate::devices::bus::BusDevice;
use crate::phases::PhaseLog;

pub struct PhasePort {
    phases: PhaseLog,
}

impl PhasePort {
    pub fn new(phases: PhaseLog) -> Self {
        PhasePort { phases }
    }
}

impl BusDevice for PhasePort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&self, _offset: u64, data: &[u8]) {
        if let Some(&id) = data.first() {
            self.phases.record_guest(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn records_guest_phases() {
        let phases = PhaseLog::new(Instant::now());
        let port = PhasePort::new(phases.clone());
        port.write(0, &[1]);
        port.write(0, &[3]);
        port.write(0, &[]);
        let names: Vec<_> = phases.events().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["init started", "job started"]);
    }
}
