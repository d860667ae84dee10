//! bootbox's KVM monitor: loads a Linux kernel and initrd straight into guest memory, emulates a
//! serial port, an i8042 reset line, exit and phase ports and virtio-mmio devices, and runs the
//! vCPUs until the guest exits.

/// Checks an internal invariant in builds with the `internal-checks` feature (a debug build
/// of the monitor that panics on broken bookkeeping); compiles to nothing otherwise, so hot
/// paths pay nothing in normal builds. The condition must be free of side effects.
#[macro_export]
macro_rules! internal_check {
    ($cond:expr, $($msg:tt)+) => {
        if cfg!(feature = "internal-checks") && !$cond {
            panic!("internal check failed: {}", format_args!($($msg)+));
        }
    };
}

pub mod boot;
pub mod devices;
pub mod error;
pub mod memory;
pub mod phases;
pub mod run_control;
pub mod sandbox;
pub mod snapshot;
pub mod stats;
pub mod vcpu;
pub mod vm;

pub use boot::loader::InitrdPart;
pub use error::VmError;
pub use phases::PhaseLog;
pub use run_control::GuestExit;
pub use vm::{
    kvm_is_hardware_accelerated, ConsoleHandle, ConsoleSink, ReadyVm, RunOutcome, StopHandle, Vm,
    VmConfig,
};

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(feature = "internal-checks")]
    #[should_panic(expected = "internal check failed: two is not three")]
    fn internal_checks_fire_with_the_feature() {
        internal_check!(1 + 1 == 3, "two is not {}", "three");
    }

    #[test]
    #[cfg(not(feature = "internal-checks"))]
    fn internal_checks_are_compiled_out_without_the_feature() {
        internal_check!(1 + 1 == 3, "must not fire in a normal build");
    }
}
