//! bootbox's KVM monitor: loads a Linux kernel and initrd straight into guest memory, emulates a
//! serial port, an i8042 reset line, exit and phase ports and virtio-mmio devices, and runs the
//! vCPUs until the guest exits.

pub mod devices;
