//! The created VM before it runs: [`Vm::new`] opens KVM and builds the VM with its memory,
//! irqchip, PIT and legacy devices (serial, i8042, exit and phase ports), and starts copying an
//! ELF kernel and the initrd into its memory on a loader thread ([`crate::boot::preload`]);
//! [`Vm::add_virtio_device`] maps virtio-mmio devices and announces them on the command line;
//! the handles ([`StopHandle`], [`ConsoleHandle`]) reach into a VM from other threads. What to
//! put in the VM's memory and vCPUs is the next step's business ([`Vm::load`]).

use super::config::VmConfig;
use super::host::open_kvm;
use crate::boot::layout;
use crate::boot::preload::Preload;
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::exit_port::ExitPort;
use crate::devices::i8042::{I8042, I8042_LEN};
use crate::devices::phase_port::PhasePort;
use crate::devices::serial::{Console, SerialDevice};
use crate::devices::virtio::{MmioTransport, VirtioDevice};
use crate::error::VmError;
use crate::memory;
use crate::phases::PhaseLog;
use crate::run_control::RunControl;
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::sync::Arc;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Ends a run from another thread (for Ctrl-C handling). Cheap to clone.
#[derive(Clone)]
pub struct StopHandle(Arc<RunControl>);

impl StopHandle {
    /// Ends the run with [`GuestExit::Stopped`] (no effect once the run has an outcome). Only
    /// sets a flag and writes an eventfd, so it is safe to call from a signal handler; the
    /// VM's event loop turns the request into the outcome.
    pub fn stop(&self) {
        self.0.request_stop();
    }
}

/// Read access to the console while or after the VM runs (also when `run` fails).
#[derive(Clone)]
pub struct ConsoleHandle(Arc<Console>);

impl ConsoleHandle {
    /// The last console lines.
    pub fn tail(&self) -> Vec<String> {
        self.0.tail()
    }
    /// Captured output (with [`ConsoleSink::Capture`]).
    pub fn captured(&self) -> Vec<u8> {
        self.0.captured()
    }
}

/// A created, not yet running VM.
pub struct Vm {
    pub(super) config: VmConfig,
    pub(super) phases: PhaseLog,
    pub(super) kvm: Kvm,
    pub(super) fd: VmFd,
    pub(super) mem: GuestMemoryMmap,
    pub(super) pio: Bus,
    pub(super) mmio: Bus,
    pub(super) control: Arc<RunControl>,
    pub(super) console: Arc<Console>,
    pub(super) serial: Arc<SerialDevice>,
    pub(super) virtio_cmdline: Vec<String>,
    pub(super) virtio_count: u32,
    /// The virtio transports, kept to stop their devices and read their stats after the run.
    pub(super) virtio: Vec<Arc<MmioTransport>>,
    /// The kernel and initrd copies started with the VM ([`Vm::load`] finishes them); `None`
    /// when the serial loader does them (or nothing is to be loaded: a restored snapshot).
    pub(super) preload: Option<Preload>,
}

fn join_cmdline(base: &str, extras: &[String]) -> String {
    let mut c = base.trim().to_string();
    for extra in extras {
        if !c.is_empty() {
            c.push(' ');
        }
        c.push_str(extra);
    }
    c
}

impl Vm {
    /// Opens /dev/kvm, creates the VM with its memory, irqchip, PIT and legacy devices.
    pub fn new(config: VmConfig, phases: PhaseLog) -> Result<Vm, VmError> {
        Self::build(config, phases, None)
    }

    /// Like [`Vm::new`], with `mem` as guest memory instead of fresh anonymous memory (a
    /// snapshot's memory, mapped copy-on-write).
    pub fn with_memory(
        config: VmConfig,
        phases: PhaseLog,
        mem: GuestMemoryMmap,
    ) -> Result<Vm, VmError> {
        Self::build(config, phases, Some(mem))
    }

    fn build(
        config: VmConfig,
        phases: PhaseLog,
        mem: Option<GuestMemoryMmap>,
    ) -> Result<Vm, VmError> {
        if config.vcpus == 0 || config.vcpus > layout::MAX_VCPUS {
            return Err(VmError::Config(format!(
                "{} vCPUs requested; use 1 to {}",
                config.vcpus,
                layout::MAX_VCPUS
            )));
        }
        // A booting VM's memory comes first, so that copying the kernel and initrd into it
        // (on a loader thread, see `boot::preload`) overlaps with creating the VM below.
        let (mem, preload) = match mem {
            Some(mem) => (mem, None),
            None => {
                let mem = memory::create_guest_memory(config.mem_mib)?;
                let preload = Preload::start(&mem, &config.kernel, &config.initrd);
                (mem, preload)
            }
        };
        let kvm = open_kvm()?;
        // The phases around the two KVM calls that take time on some hosts (KVM_CREATE_VM and
        // registering guest memory) tell the host's share from the monitor's.
        phases.record("kvm opened");
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        phases.record("kvm vm created");
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;

        // Guest memory before the in-kernel irqchip: once the irqchip exists, registering a
        // memory slot waits several milliseconds in KVM (measured: 5-10 ms after
        // KVM_CREATE_IRQCHIP, 0.1-2 ms before it), and nothing needs the irqchip first.
        memory::register_with_kvm(&fd, &mem)?;
        phases.record("memory ready");

        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        phases.record("kvm devices created");
        if let Some(preload) = &preload {
            preload.release();
        }

        let control = RunControl::new()?;
        let console = Console::new(config.console, phases.clone());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| VmError::Thread(format!("cannot create an eventfd: {e}")))?;
        fd.register_irqfd(&serial_irq, layout::COM1_GSI)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let serial = Arc::new(
            SerialDevice::new(serial_irq, console.clone())
                .map_err(|e| VmError::Thread(format!("cannot create an eventfd: {e}")))?,
        );

        let mut pio = Bus::new();
        let devices: [(u64, u64, &'static str, Arc<dyn BusDevice>); 4] = [
            (
                layout::COM1_PORT,
                layout::COM1_LEN,
                "serial",
                serial.clone(),
            ),
            (
                layout::I8042_DATA_PORT,
                I8042_LEN,
                "i8042",
                Arc::new(I8042::new(control.clone())),
            ),
            (
                layout::EXIT_PORT,
                1,
                "exit-port",
                Arc::new(ExitPort::new(control.clone())),
            ),
            (
                layout::PHASE_PORT,
                1,
                "phase-port",
                Arc::new(PhasePort::new(phases.clone())),
            ),
        ];
        for (base, len, name, dev) in devices {
            pio.insert(base, len, name, dev)
                .map_err(|e| VmError::Config(format!("{name}: {e}")))?;
        }
        Ok(Vm {
            config,
            phases,
            kvm,
            fd,
            mem,
            pio,
            mmio: Bus::new(),
            control,
            console,
            serial,
            virtio_cmdline: Vec::new(),
            virtio_count: 0,
            virtio: Vec::new(),
            preload,
        })
    }

    /// Guest memory (for device models that need it before the run).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Puts `device` in the next virtio-mmio slot, wires its ioeventfd/irqfd, maps it and
    /// announces it on the kernel command line. Returns the slot's (base, GSI).
    pub fn add_virtio_device(
        &mut self,
        name: &'static str,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(u64, u32), VmError> {
        let dev_err = |reason: String| VmError::Device { name, reason };
        let (base, gsi) = layout::virtio_mmio_slot(self.virtio_count).ok_or_else(|| {
            dev_err(format!(
                "no free virtio-mmio slot (at most {})",
                layout::VIRTIO_MMIO_MAX_DEVICES
            ))
        })?;
        let transport = MmioTransport::new(device, self.mem.clone())
            .map_err(|e| dev_err(e.to_string()))?
            .with_stats(self.config.stats);
        transport
            .register(&self.fd, base, gsi)
            .map_err(|e| dev_err(e.to_string()))?;
        let transport = Arc::new(transport);
        self.mmio
            .insert(base, layout::VIRTIO_MMIO_SIZE, name, transport.clone())
            .map_err(|e| dev_err(e.to_string()))?;
        self.virtio.push(transport);
        self.virtio_count += 1;
        self.virtio_cmdline
            .push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        Ok((base, gsi))
    }

    /// A handle that ends the run from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.control.clone())
    }

    /// A handle to the console's tail and capture, usable after `run` returned an error.
    pub fn console_handle(&self) -> ConsoleHandle {
        ConsoleHandle(self.console.clone())
    }

    /// The run's one statistics switch (`VmConfig::stats`), for the devices the caller builds.
    pub fn stats_enabled(&self) -> bool {
        self.config.stats
    }

    /// The command line the kernel will get (config + virtio device entries).
    pub fn kernel_cmdline(&self) -> String {
        join_cmdline(&self.config.cmdline, &self.virtio_cmdline)
    }

    /// Creates the vCPUs, without state: the kernel loader ([`Vm::load`]) gives them their boot
    /// state, and a restored snapshot would give them their saved state instead.
    pub(super) fn create_vcpus(&self) -> Result<Vec<VcpuFd>, VmError> {
        (0..self.config.vcpus)
            .map(|id| {
                self.fd
                    .create_vcpu(u64::from(id))
                    .map_err(|source| VmError::VcpuSetup {
                        cpu: id,
                        what: "KVM_CREATE_VCPU",
                        source,
                    })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_assembly() {
        let extras = vec!["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        assert_eq!(
            join_cmdline(" console=ttyS0 ", &extras),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(join_cmdline("", &extras), extras[0]);
        assert_eq!(join_cmdline("quiet", &[]), "quiet");
    }

    #[test]
    fn bad_vcpu_counts_are_refused() {
        let mut c = VmConfig::new("/nonexistent", "");
        c.vcpus = 0;
        let err = Vm::new(c, PhaseLog::new(std::time::Instant::now()))
            .err()
            .unwrap();
        assert!(err.to_string().contains("vCPUs"), "{err}");
    }
}
