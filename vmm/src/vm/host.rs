//! What this host's KVM offers: opening /dev/kvm with errors that say what to do, and whether
//! KVM runs on hardware virtualisation.

use crate::error::VmError;
use kvm_ioctls::Kvm;

/// Whether this host's KVM uses hardware virtualisation (VT-x / AMD-V), judged from the
/// `vmx`/`svm` CPU flags in /proc/cpuinfo.
pub fn kvm_is_hardware_accelerated() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|s| cpuinfo_has_virt(&s))
}

fn cpuinfo_has_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

fn kvm_open_error(e: kvm_ioctls::Error) -> VmError {
    match e.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => VmError::KvmMissing,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::Kvm {
            what: "opening /dev/kvm",
            source: e,
        },
    }
}

/// Opens /dev/kvm.
pub fn open_kvm() -> Result<Kvm, VmError> {
    Kvm::new().map_err(kvm_open_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hardware_detection_reads_cpu_flags() {
        assert!(cpuinfo_has_virt(
            "processor: 0\nflags\t\t: fpu vme vmx sse\n"
        ));
        assert!(cpuinfo_has_virt("flags : fpu svm\n"));
        assert!(!cpuinfo_has_virt("flags : fpu vme sse4_2 vmxnot\n"));
        assert!(!cpuinfo_has_virt(""));
    }

    #[test]
    fn kvm_open_errors_say_what_to_do() {
        let e = |errno| kvm_open_error(kvm_ioctls::Error::new(errno)).to_string();
        assert!(e(libc::ENOENT).contains("load the kvm module"));
        assert!(e(libc::EACCES).contains("group kvm"));
        assert!(e(libc::EBUSY).contains("opening /dev/kvm"));
    }
}
