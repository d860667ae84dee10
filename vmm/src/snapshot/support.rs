//! Whether this host's KVM can snapshot and restore a bootbox VM: the capabilities
//! [`super::VcpuState`] and [`super::VmState`] rely on, asked of a throwaway VM.

use kvm_ioctls::{Cap, Kvm};

/// The KVM capabilities a snapshot needs, with the names doctor prints.
const NEEDED: [(Cap, &str); 7] = [
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::Xsave, "KVM_CAP_XSAVE"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
];

/// `Ok(())` when /dev/kvm opens and offers every needed capability; otherwise what is missing.
pub fn host_support() -> Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))?;
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(cap, _)| !vm.check_extension(*cap))
        .map(|(_, name)| *name)
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("KVM lacks {}", missing.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_hosts_kvm_is_checked_without_panicking() {
        // Whatever the host offers, the answer is a verdict, and a KVM that cannot be opened
        // says so.
        match super::host_support() {
            Ok(()) => {}
            Err(why) => assert!(why.contains("KVM"), "{why}"),
        }
    }
}
