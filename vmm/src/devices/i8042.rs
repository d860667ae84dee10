//! The bit of the i8042 keyboard controller a micro-VM needs: the CPU reset line. Writing
//! 0xFE to the command port (0x64) is how Linux reboots (`reboot=k`); it ends the run as a
//! guest reset. Everything else reads as an idle controller with no keyboard.

use crate::devices::bus::BusDevice;
use crate::run_control::{GuestExit, RunControl};
use std::sync::Arc;

/// The device spans 0x60..=0x64; offset 0 is data, offset 4 is command/status.
pub const I8042_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    control: Arc<RunControl>,
}

impl I8042 {
    pub fn new(control: Arc<RunControl>) -> Self {
        I8042 { control }
    }
}

impl BusDevice for I8042 {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so Linux never waits on us.
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.control.finish(Ok(GuestExit::Reset));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_run() {
        let control = RunControl::new().unwrap();
        let dev = I8042::new(control.clone());
        let mut status = [0xaa];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert!(!control.is_stopping());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert!(control.is_stopping());
        assert!(matches!(control.wait(), Ok(GuestExit::Reset)));
    }
}
