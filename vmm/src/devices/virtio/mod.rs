//! virtio over MMIO: the transport and the devices behind it.
//!
//! Seam with the VM (owned by `vm.rs`): the VM picks an MMIO slot (`base`, `gsi`) for each
//! device, wraps it in an [`MmioTransport`], calls [`MmioTransport::register`] so KVM delivers
//! queue notifications (ioeventfd) and interrupts (irqfd) without a VM exit, maps the transport
//! on its MMIO bus, and announces it with `virtio_mmio.device=4K@<base>:<gsi>` on the command line.

pub mod mmio;

pub use mmio::{MmioTransport, VirtioDevice, VirtioError};
