//! `bootbox doctor`: checks what a run needs (KVM access and acceleration, the guest kernel,
//! the guest init and the appliance cache) and prints what to fix.

use std::path::Path;

use super::args::DoctorArgs;
use super::{kernel, EXIT_LAUNCHER};

pub(crate) struct Check {
    pub(crate) ok: bool,
    pub(crate) what: String,
    pub(crate) fix: Option<String>,
}

fn check_kvm() -> Vec<Check> {
    let mut out = Vec::new();
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    out.push(match kvm {
        Ok(_) => Check {
            ok: true,
            what: "/dev/kvm opens read-write".into(),
            fix: None,
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check {
            ok: false,
            what: "/dev/kvm does not exist".into(),
            fix: Some(
                "load the KVM module (modprobe kvm_intel or kvm_amd) or run on a KVM host".into(),
            ),
        },
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Check {
            ok: false,
            what: "no permission on /dev/kvm".into(),
            fix: Some(
                "add yourself to group kvm (sudo usermod -aG kvm $USER, then log in again)".into(),
            ),
        },
        Err(e) => Check {
            ok: false,
            what: format!("/dev/kvm: {e}"),
            fix: None,
        },
    });
    out.push(if vmm::vm::kvm_is_hardware_accelerated() {
        Check { ok: true, what: "KVM is hardware-accelerated (vmx/svm present)".into(), fix: None }
    } else {
        Check {
            ok: false,
            what: "KVM has no hardware virtualisation here (no vmx/svm flag): Linux guests cannot boot directly".into(),
            fix: Some("run on a host with VT-x/AMD-V; the test suite uses the nested test host (scripts/testhost.sh)".into()),
        }
    });
    out
}

fn check_kernel(fix: bool) -> Check {
    let found = kernel::find(None);
    match found {
        Ok(p) if crate::kernel::looks_like_kernel(&p) => Check {
            ok: true,
            what: format!("guest kernel: {}", p.display()),
            fix: None,
        },
        Ok(p) => Check {
            ok: false,
            what: format!("{} is not an ELF vmlinux or a bzImage", p.display()),
            fix: Some("point BOOTBOX_KERNEL at a kernel built by scripts/build-kernel.sh".into()),
        },
        Err(e) if fix => match build_kernel() {
            Ok(()) => check_kernel(false),
            Err(why) => Check {
                ok: false,
                what: e.to_string(),
                fix: Some(why),
            },
        },
        Err(e) => Check {
            ok: false,
            what: e.to_string(),
            fix: Some("run `bootbox doctor --fix` or scripts/build-kernel.sh".into()),
        },
    }
}

/// Runs scripts/build-kernel.sh from the source tree this binary was built in.
fn build_kernel() -> Result<(), String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-kernel.sh");
    if !script.is_file() {
        return Err(format!(
            "{} not found: build the kernel from a bootbox checkout",
            script.display()
        ));
    }
    let status = std::process::Command::new(&script)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} failed ({status}); see its messages above",
            script.display()
        ))
    }
}

fn check_appliance() -> Vec<Check> {
    let mut out = Vec::new();
    match appliance::find_init() {
        Ok(p) => out.push(Check {
            ok: true,
            what: format!("guest init: {}", p.display()),
            fix: None,
        }),
        Err(e) => out.push(Check {
            ok: false,
            what: e.to_string(),
            fix: Some("cargo build --release -p bootbox-init".into()),
        }),
    }
    match appliance::default_cache_dir() {
        Ok(dir) => {
            let app = dir.join("appliance");
            let n = std::fs::read_dir(&app)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| e.path().extension().is_some_and(|x| x == "cpio"))
                        .count()
                })
                .unwrap_or(0);
            let writable = std::fs::create_dir_all(&app).is_ok();
            out.push(Check {
                ok: writable,
                what: format!("appliance cache {}: {n} cached appliance(s)", app.display()),
                fix: (!writable)
                    .then(|| "make the cache directory writable or set BOOTBOX_CACHE".into()),
            });
        }
        Err(e) => out.push(Check {
            ok: false,
            what: e.to_string(),
            fix: None,
        }),
    }
    out
}

/// The disk inspection tools the appliance takes from the host. A missing one does not fail
/// doctor: the appliance is built without it.
fn check_disk_tools() -> Vec<Check> {
    // Each tool with the package that brings it (Debian's names).
    let tools = appliance::DISK_TOOLS
        .iter()
        .map(|t| (t, "util-linux"))
        .chain(appliance::DISK_ONLY_TOOLS.iter().map(|t| (t, "lvm2")));
    tools
        .map(|(tool, package)| match appliance::elf::find_program(tool) {
            Ok(path) => Check {
                ok: true,
                what: format!("appliance: {tool} ({})", path.display()),
                fix: None,
            },
            Err(_) => Check {
                ok: false,
                what: format!(
                    "appliance: no {tool} on this host, so --disk jobs cannot use it in the guest"
                ),
                fix: Some(format!("install {package} (apt-get install {package})")),
            },
        })
        .collect()
}

/// What the monitor's sandbox can use on this kernel. A missing part does not fail doctor:
/// runs go on without it (and say so once).
fn check_sandbox() -> Vec<Check> {
    use vmm::sandbox::LandlockSupport;
    let support = vmm::sandbox::host_support();
    let landlock = match support.landlock {
        LandlockSupport::Abi(abi) => Check {
            ok: true,
            what: format!(
                "sandbox: Landlock ABI {abi}: the monitor can only open its kernel, initrd, \
                 shares and /dev/kvm{}",
                if abi < 3 {
                    " (truncating files is not restricted before ABI 3)"
                } else {
                    ""
                }
            ),
            fix: None,
        },
        LandlockSupport::NotEnabled => Check {
            ok: false,
            what: "sandbox: Landlock is built in but not enabled; runs go on without file \
                   confinement"
                .into(),
            fix: Some("add landlock to the kernel's lsm= boot parameter".into()),
        },
        LandlockSupport::NotBuilt => Check {
            ok: false,
            what: "sandbox: the kernel has no Landlock; runs go on without file confinement".into(),
            fix: Some("use a kernel built with CONFIG_SECURITY_LANDLOCK (5.13 or later)".into()),
        },
    };
    let seccomp = Check {
        ok: support.seccomp_filters,
        what: if support.seccomp_filters {
            "sandbox: seccomp filters: each monitor thread gets its own system call allowlist"
                .into()
        } else {
            "sandbox: no seccomp filters with the trap action; runs go on without system call \
             filtering"
                .into()
        },
        fix: (!support.seccomp_filters)
            .then(|| "use a kernel with CONFIG_SECCOMP_FILTER (4.14 or later)".into()),
    };
    let no_new_privs = Check {
        ok: support.no_new_privs,
        what: if support.no_new_privs {
            "sandbox: no_new_privs".into()
        } else {
            "sandbox: no no_new_privs on this kernel; runs go on without it".into()
        },
        fix: (!support.no_new_privs).then(|| "use Linux 3.5 or later".into()),
    };
    vec![landlock, seccomp, no_new_privs]
}

pub fn doctor(a: DoctorArgs) -> u8 {
    let mut checks = check_kvm();
    checks.push(check_kernel(a.fix));
    checks.push(check_warm_start());
    checks.extend(check_appliance());
    let mut all_ok = true;
    for c in &checks {
        println!("[{}] {}", if c.ok { " ok " } else { "FAIL" }, c.what);
        if let Some(f) = &c.fix {
            println!("       fix: {f}");
        }
        all_ok &= c.ok;
    }
    for c in check_disk_tools().iter().chain(&check_sandbox()) {
        println!("[{}] {}", if c.ok { " ok " } else { "warn" }, c.what);
        if let Some(f) = &c.fix {
            println!("       fix: {f}");
        }
    }
    if all_ok {
        println!("bootbox is ready: try `bootbox run --share . -- find /share -maxdepth 1`");
        0
    } else {
        EXIT_LAUNCHER
    }
}

/// `bootbox doctor`'s line on warm start: whether KVM here can snapshot and restore, and
/// whether the snapshot directory is writable.
fn check_warm_start() -> Check {
    let dir = appliance::default_cache_dir().map(|root| crate::warm::snapshot_dir(&root));
    let writable = dir.as_ref().map_err(|e| e.to_string()).and_then(|d| {
        std::fs::create_dir_all(d)
            .and_then(|()| tempfile_in(d))
            .map_err(|e| format!("{}: {e}", d.display()))
    });
    match (vmm::snapshot::support::host_support(), writable) {
        (Ok(()), Ok(())) => Check {
            ok: true,
            what: "warm start: KVM can snapshot and restore; snapshots go to the cache".into(),
            fix: None,
        },
        (Err(why), _) => Check {
            ok: false,
            what: format!("warm start unavailable: {why}"),
            fix: Some("runs boot cold (as with --cold); use a newer host kernel".into()),
        },
        (_, Err(why)) => Check {
            ok: false,
            what: format!("warm start: the snapshot directory is not writable ({why})"),
            fix: Some("fix its permissions or set BOOTBOX_CACHE".into()),
        },
    }
}

/// Creates and removes a file in `dir`.
fn tempfile_in(dir: &Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".doctor.{}", std::process::id()));
    std::fs::File::create(&probe)?;
    std::fs::remove_file(&probe)
}
