//! [`VmConfig`]: what to boot and how (kernel, initrd, command line, memory, vCPUs, console,
//! stdin, timeout, statistics), and the cheap checks that need neither KVM nor guest memory.

use crate::boot::layout;
use crate::boot::loader::{self, InitrdPart};
use crate::devices::serial::ConsoleSink;
use crate::error::VmError;
use std::path::PathBuf;
use std::time::Duration;

/// What to boot and how.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// ELF vmlinux (PVH note preferred) or bzImage.
    pub kernel: PathBuf,
    pub initrd: Vec<InitrdPart>,
    /// Kernel command line; `virtio_mmio.device=` entries are appended for added devices.
    pub cmdline: String,
    pub mem_mib: u32,
    pub vcpus: u8,
    pub console: ConsoleSink,
    /// Forward host stdin to the serial port.
    pub stdin: bool,
    /// End the run with `GuestExit::Timeout` after this long.
    pub timeout: Option<Duration>,
    /// Count VM exits and device time (see [`crate::stats::Report`]).
    pub stats: bool,
}

impl VmConfig {
    /// A config with 256 MiB, one vCPU, console on stdout, no initrd, no stdin, no timeout.
    pub fn new(kernel: impl Into<PathBuf>, cmdline: impl Into<String>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            initrd: Vec::new(),
            cmdline: cmdline.into(),
            mem_mib: 256,
            vcpus: 1,
            console: ConsoleSink::Stdout,
            stdin: false,
            timeout: None,
            stats: false,
        }
    }

    /// Checks what needs neither KVM nor guest memory: the vCPU count, the memory size and
    /// that the kernel file is an x86-64 ELF vmlinux or a bzImage. It reads a few hundred
    /// bytes; call it before anything expensive so a typo fails at once.
    pub fn check(&self) -> Result<(), VmError> {
        if self.vcpus == 0 || self.vcpus > layout::MAX_VCPUS {
            return Err(VmError::Config(format!(
                "{} vCPUs requested; use 1 to {}",
                self.vcpus,
                layout::MAX_VCPUS
            )));
        }
        if self.mem_mib < layout::MIN_MEM_MIB {
            return Err(VmError::MemoryTooSmall {
                mib: self.mem_mib,
                needed_mib: u64::from(layout::MIN_MEM_MIB),
                what: "the minimum guest size",
            });
        }
        loader::check_kernel_file(&self.kernel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults() {
        let c = VmConfig::new("/boot/vmlinux", "console=ttyS0");
        assert_eq!(
            (c.mem_mib, c.vcpus, c.console),
            (256, 1, ConsoleSink::Stdout)
        );
        assert!(!c.stdin && !c.stats && c.timeout.is_none());
    }
}
