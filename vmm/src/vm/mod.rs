//! The public face of the monitor, in the order a VM goes through it:
//! 1. [`VmConfig`] ([`config`]) says what to boot and how;
//! 2. [`Vm::new`] and [`Vm::add_virtio_device`] ([`machine`]) build the VM and its devices;
//! 3. [`Vm::load`] ([`load`]) puts the kernel, initrd and boot structures into memory and gives
//!    the vCPUs their boot state, yielding a [`ReadyVm`];
//! 4. [`ReadyVm::run`] ([`run`]) runs the vCPUs, with the event loop of [`events`], until the
//!    guest finishes, and reports a [`RunOutcome`].
//!
//! [`Vm::run`] does steps 3 and 4 at once. [`restore`] is the other way through step 3:
//! [`Vm::restore`] puts a snapshot's state into the VM instead of booting a kernel, and
//! [`ReadyVm::run_to_snapshot`] makes such a snapshot.

pub mod config;
pub mod events;
pub mod host;
pub mod load;
pub mod machine;
pub mod restore;
pub mod run;

pub use crate::boot::loader::InitrdPart;
pub use crate::devices::serial::ConsoleSink;
pub use crate::error::VmError;
pub use crate::run_control::GuestExit;
pub use config::VmConfig;
pub use host::kvm_is_hardware_accelerated;
pub use machine::{ConsoleHandle, StopHandle, Vm};
pub use restore::SnapshotPoint;
pub use run::{ReadyVm, RunOutcome};
