//! Device models: the buses that route exits, the legacy devices (serial, i8042 reset, the exit,
//! phase and job ports) and the virtio-mmio devices. Nothing here creates VMs or vCPUs.

pub mod bus;
pub mod exit_port;
pub mod i8042;
pub mod job_port;
pub mod phase_port;
pub mod serial;
pub mod virtio;
