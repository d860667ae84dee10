//! Snapshots of a stopped VM, so jobs can resume an appliance booted once instead of booting
//! a kernel each time: capture and restore of all KVM state (per vCPU in [`vcpu_state`],
//! VM-wide in [`vm_state`]), the snapshot file ([`format`]) and copy-on-write guest memory
//! from it ([`memory_map`]). The module depends only on kvm-ioctls, kvm-bindings and
//! vm-memory types, so whichever code owns the VM wires it in:
//!
//! * snapshot: stop every vCPU; [`finish_pending_io`] on each; [`saveable_msrs`] once; [`VcpuState::capture`] per vCPU;
//!   [`VmState::capture`]; the devices' own state as blobs; [`write_snapshot`].
//! * restore: [`read_snapshot`]; [`map_guest_memory`] and register it as memory slots;
//!   create the same in-kernel devices (irqchip, PIT) and vCPUs; [`VmState::restore`];
//!   [`VcpuState::restore`] per vCPU; restore device blobs; run.

pub(crate) mod codec;
pub mod format;
pub mod memory_map;
pub mod support;
pub mod vcpu_state;
pub mod vm_state;

pub use codec::DecodeError;
pub use format::{
    read_snapshot, write_snapshot, MemoryRegionEntry, SnapshotError, SnapshotFile, SnapshotKey,
    SnapshotState,
};
pub use memory_map::{map_guest_memory, MemoryMapError};
pub use vcpu_state::{finish_pending_io, saveable_msrs, VcpuState, VcpuStateError};
pub use vm_state::{IrqchipState, VmState, VmStateError};
