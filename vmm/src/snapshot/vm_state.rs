//! VM-wide KVM state outside the vCPUs: the in-kernel interrupt controllers (both PICs and the
//! IOAPIC), the in-kernel PIT and the kvm-clock. Capture reads whichever of them the VM has;
//! restore puts them into a fresh VM that was built with the same in-kernel devices.

use super::codec::{DecodeError, Decoder, Encoder};
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, VmFd};
use zerocopy::IntoBytes;

/// Why the VM-wide state could not be captured or restored.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("{ioctl} failed: {source}")]
    Ioctl {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the snapshot has {what} state but the VM to restore into has no {what}")]
    DeviceMissing { what: &'static str },
}

fn ioctl_err(ioctl: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Ioctl { ioctl, source }
}

/// The three chips of KVM's in-kernel irqchip, as KVM_GET_IRQCHIP returns them.
#[derive(Clone, Copy)]
pub struct IrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

impl IrqchipState {
    fn chips(&self) -> [&kvm_irqchip; 3] {
        [&self.pic_master, &self.pic_slave, &self.ioapic]
    }
}

impl PartialEq for IrqchipState {
    fn eq(&self, other: &Self) -> bool {
        self.chips()
            .iter()
            .zip(other.chips())
            .all(|(a, b)| a.as_bytes() == b.as_bytes())
    }
}

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IrqchipState { PIC master, PIC slave, IOAPIC }")
    }
}

/// The VM-wide state; each part is `None` when the snapshotted VM did not have it.
#[derive(Clone, Debug, PartialEq)]
pub struct VmState {
    pub irqchip: Option<IrqchipState>,
    pub pit: Option<kvm_pit_state2>,
    /// The kvm-clock as KVM_GET_CLOCK read it (`None` without KVM_CAP_ADJUST_CLOCK).
    pub clock: Option<kvm_clock_data>,
}

/// Whether a KVM error says the VM lacks the device asked about: KVM answers ENXIO for
/// KVM_GET_IRQCHIP without an irqchip and KVM_GET_PIT2 without a PIT.
fn is_absent(err: &kvm_ioctls::Error) -> bool {
    err.errno() == libc::ENXIO
}

impl VmState {
    /// Reads the VM-wide state of `vm`, whose vCPUs must all be stopped. An irqchip or PIT
    /// the VM was built without is recorded as absent; any other failure is an error.
    pub fn capture(vm: &VmFd) -> Result<VmState, VmStateError> {
        let irqchip = match read_chip(vm, KVM_IRQCHIP_PIC_MASTER) {
            Err(e) if is_absent(&e) => None,
            Err(e) => return Err(ioctl_err("KVM_GET_IRQCHIP")(e)),
            Ok(pic_master) => Some(IrqchipState {
                pic_master,
                pic_slave: read_chip(vm, KVM_IRQCHIP_PIC_SLAVE)
                    .map_err(ioctl_err("KVM_GET_IRQCHIP"))?,
                ioapic: read_chip(vm, KVM_IRQCHIP_IOAPIC).map_err(ioctl_err("KVM_GET_IRQCHIP"))?,
            }),
        };
        let pit = match vm.get_pit2() {
            Ok(pit) => Some(pit),
            Err(e) if is_absent(&e) => None,
            Err(e) => return Err(ioctl_err("KVM_GET_PIT2")(e)),
        };
        let clock = if vm.check_extension(Cap::AdjustClock) {
            Some(vm.get_clock().map_err(ioctl_err("KVM_GET_CLOCK"))?)
        } else {
            None
        };
        Ok(VmState {
            irqchip,
            pit,
            clock,
        })
    }

    /// Puts this state into `vm`, a fresh VM built with the same in-kernel devices (irqchip
    /// and PIT created) before any of its vCPUs runs. The kvm-clock continues from the
    /// snapshot's value, so the guest sees no time pass while it was saved.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        if let Some(irqchip) = &self.irqchip {
            for chip in irqchip.chips() {
                set_device(vm.set_irqchip(chip), "KVM_SET_IRQCHIP", "in-kernel irqchip")?;
            }
        }
        if let Some(pit) = &self.pit {
            set_device(vm.set_pit2(pit), "KVM_SET_PIT2", "in-kernel PIT")?;
        }
        if let Some(clock) = &self.clock {
            vm.set_clock(&clock_to_restore(clock))
                .map_err(ioctl_err("KVM_SET_CLOCK"))?;
        }
        Ok(())
    }

    pub(crate) fn encode(&self, e: &mut Encoder) {
        e.option(self.irqchip.as_ref(), |e, chips| {
            for chip in chips.chips() {
                e.pod(chip);
            }
        });
        e.option(self.pit.as_ref(), |e, v| e.pod(v));
        e.option(self.clock.as_ref(), |e, v| e.pod(v));
    }

    pub(crate) fn decode(d: &mut Decoder<'_>) -> Result<VmState, DecodeError> {
        let irqchip = d.option("irqchip", |d| {
            Ok(IrqchipState {
                pic_master: decode_chip(d, KVM_IRQCHIP_PIC_MASTER, "PIC master")?,
                pic_slave: decode_chip(d, KVM_IRQCHIP_PIC_SLAVE, "PIC slave")?,
                ioapic: decode_chip(d, KVM_IRQCHIP_IOAPIC, "IOAPIC")?,
            })
        })?;
        let pit = d.option("PIT", |d| d.pod("PIT"))?;
        let clock = d.option("kvm-clock", |d| d.pod("kvm-clock"))?;
        Ok(VmState {
            irqchip,
            pit,
            clock,
        })
    }
}

/// Maps the result of setting an in-kernel device's state: ENXIO means the VM lacks it.
fn set_device(
    result: Result<(), kvm_ioctls::Error>,
    ioctl: &'static str,
    what: &'static str,
) -> Result<(), VmStateError> {
    result.map_err(|e| {
        if is_absent(&e) {
            VmStateError::DeviceMissing { what }
        } else {
            ioctl_err(ioctl)(e)
        }
    })
}

fn read_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, kvm_ioctls::Error> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)?;
    Ok(chip)
}

fn decode_chip(d: &mut Decoder<'_>, chip_id: u32, what: &str) -> Result<kvm_irqchip, DecodeError> {
    let chip: kvm_irqchip = d.pod(what)?;
    if chip.chip_id != chip_id {
        return Err(DecodeError::new(
            what,
            format!("chip id is {}, expected {chip_id}", chip.chip_id),
        ));
    }
    Ok(chip)
}

/// The clock to hand KVM_SET_CLOCK: the saved value with no flags. KVM_CLOCK_TSC_STABLE is
/// a read-only report, and the realtime/host-TSC fields describe the capturing host's clocks,
/// meaningless here; with no flags KVM simply continues kvm-clock from `clock`.
fn clock_to_restore(saved: &kvm_clock_data) -> kvm_clock_data {
    kvm_clock_data {
        clock: saved.clock,
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kvm_bindings::KVM_CLOCK_TSC_STABLE;

    pub(crate) fn sample_state() -> VmState {
        let mut chips = [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ]
        .map(|chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        });
        // SAFETY: writing a byte of a plain-old-data union; every bit pattern is valid.
        unsafe { chips[2].chip.dummy[17] = 0x5a };
        VmState {
            irqchip: Some(IrqchipState {
                pic_master: chips[0],
                pic_slave: chips[1],
                ioapic: chips[2],
            }),
            pit: Some(kvm_pit_state2 {
                flags: 1,
                ..Default::default()
            }),
            clock: Some(kvm_clock_data {
                clock: 123_456_789,
                flags: KVM_CLOCK_TSC_STABLE,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn state_round_trips_through_its_encoding() {
        let state = sample_state();
        let mut e = Encoder::default();
        state.encode(&mut e);
        let bytes = e.into_bytes();
        let mut d = Decoder::new(&bytes);
        assert_eq!(VmState::decode(&mut d).unwrap(), state);
        d.finish("VM").unwrap();
        let mut other = state.clone();
        // SAFETY: as above.
        unsafe { other.irqchip.as_mut().unwrap().ioapic.chip.dummy[17] = 0 };
        assert_ne!(other, state, "irqchip contents take part in equality");
    }

    #[test]
    fn a_chip_in_the_wrong_slot_is_refused() {
        let mut state = sample_state();
        state.irqchip.as_mut().unwrap().pic_slave.chip_id = KVM_IRQCHIP_IOAPIC;
        let mut e = Encoder::default();
        state.encode(&mut e);
        let bytes = e.into_bytes();
        let err = VmState::decode(&mut Decoder::new(&bytes)).unwrap_err();
        assert_eq!(err.to_string(), "PIC slave: chip id is 2, expected 1");
    }

    #[test]
    fn restored_clock_carries_no_flags() {
        let restored = clock_to_restore(&sample_state().clock.unwrap());
        assert_eq!(restored.clock, 123_456_789);
        assert_eq!(restored.flags & KVM_CLOCK_TSC_STABLE, 0);
        assert_eq!(restored.flags, 0);
    }
}
