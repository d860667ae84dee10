//! The monitor's error type: every way creating, loading or running a VM can fail, each with a
//! message that says what to do about it. Boot-structure failures keep their own typed
//! [`BootError`] inside [`VmError::Boot`].

use crate::boot::error::BootError;
use std::path::PathBuf;

/// Errors of the monitor. Each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) or run on a KVM host")]
    KvmMissing,
    #[error("permission denied opening /dev/kvm: add yourself to group kvm (and log in again) or run as root")]
    KvmPermission,
    #[error("KVM: {what} failed: {source}; is this a working KVM host?")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("{mib} MiB of guest memory is too small: {what} needs at least {needed_mib} MiB; give the VM more memory")]
    MemoryTooSmall {
        mib: u32,
        needed_mib: u64,
        what: &'static str,
    },
    #[error("kernel {path}: {reason}")]
    BadKernel { path: PathBuf, reason: String },
    #[error("initrd part {path}: {reason}")]
    Initrd { path: PathBuf, reason: String },
    #[error("the initrd ({size} bytes) does not fit next to the kernel in {mem_mib} MiB of guest memory; give the VM at least {needed_mib} MiB")]
    InitrdTooLarge {
        size: u64,
        mem_mib: u64,
        needed_mib: u64,
    },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("setting up the boot structures: {0}")]
    Boot(#[from] BootError),
    #[error("setting up vCPU {cpu}: {what} failed: {source}; the host KVM lacks something bootbox needs")]
    VcpuSetup {
        cpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("snapshot: {0}")]
    Snapshot(String),
    #[error("virtio device {name}: {reason}")]
    Device { name: &'static str, reason: String },
    #[error("the guest triple-faulted (KVM_EXIT_SHUTDOWN) on {location}; the kernel crashed before it could report anything - check the kernel configuration and the console output")]
    TripleFault { location: String },
    #[error("KVM internal error on {location}: suberror {suberror} ({meaning}), instruction bytes {instruction}, data {data:x?}; the guest ran something KVM cannot emulate - on a host without VT-x/AMD-V KVM emulates the kernel, so run on a hardware KVM host")]
    InternalError {
        location: String,
        suberror: u32,
        meaning: &'static str,
        instruction: String,
        data: Vec<u64>,
    },
    #[error("KVM could not enter the guest on {location}: hardware entry failure reason {reason:#x}; the initial vCPU state is not valid on this host")]
    FailEntry { location: String, reason: u64 },
    #[error("the guest halted for good on {location} without writing an exit status; it has nothing left to run")]
    GuestHalted { location: String },
    #[error("KVM_RUN failed on vCPU {cpu}: {source}")]
    VcpuRun { cpu: u8, source: kvm_ioctls::Error },
    #[error("unexpected VM exit {exit} on {location}")]
    UnexpectedExit { exit: String, location: String },
    #[error("monitor thread setup: {0}")]
    Thread(String),
}
