//! bootbox's KVM monitor: loads a Linux kernel and initrd straight into guest memory, emulates a
//! serial port, an i8042 reset line, exit and phase ports and virtio-mmio devices, and runs the
//! vCPUs until the guest exits.

pub mod boot;
pub mod devices;
pub mod memory;
pub mod phases;
pub mod stats;
pub mod vcpu;
pub mod vm;

pub use phases::PhaseLog;
pub use vm::{
    kvm_is_hardware_accelerated, ConsoleHandle, ConsoleSink, GuestExit, InitrdPart, RunOutcome,
    StopHandle, Vm, VmConfig, VmError,
};
