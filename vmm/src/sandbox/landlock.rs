//! The Landlock half of the sandbox: turns a [`Policy`] into a ruleset and restricts the
//! calling thread (and every thread it creates afterwards) with it.
//!
//! Handled rights are those of the newest ABI this policy was written and tested for
//! ([`POLICY_ABI`]); on an older kernel the crate's best-effort mode drops what the kernel does
//! not know (REFER before ABI 2, TRUNCATE before 3, device ioctls before 5, scopes before 6),
//! so every kernel with Landlock enforces what it can.
//!
//! Handling a right and granting it nowhere denies it everywhere: nothing may be executed, no
//! device node created, no TCP port bound or connected, no signal sent and no abstract unix
//! socket reached outside the process.

use super::{path_error, LandlockOutcome, Policy, SandboxError};
use landlock::{
    Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, RestrictionStatus, Ruleset,
    RulesetAttr, RulesetCreated, RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};
use std::fmt;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::OnceLock;

/// The newest Landlock ABI whose rights this policy handles.
const POLICY_ABI: ABI = ABI::V7;

/// The device the monitor opens after confinement.
const KVM_DEVICE: &str = "/dev/kvm";
/// Read after the run for the report (`kvm_hardware`).
const CPUINFO: &str = "/proc/cpuinfo";

/// Whether the running kernel has Landlock, and which ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandlockSupport {
    /// Landlock is enabled; the kernel speaks this ABI version.
    Abi(u32),
    /// Built into the kernel but not enabled at boot.
    NotEnabled,
    /// Not built into the kernel.
    NotBuilt,
}

impl fmt::Display for LandlockSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LandlockSupport::Abi(v) => write!(f, "ABI {v}"),
            LandlockSupport::NotEnabled => write!(
                f,
                "Landlock is not enabled at boot: add landlock to the kernel's lsm= parameter"
            ),
            LandlockSupport::NotBuilt => {
                write!(
                    f,
                    "the kernel is built without Landlock (CONFIG_SECURITY_LANDLOCK)"
                )
            }
        }
    }
}

/// Asks the kernel for its Landlock ABI version.
pub fn support() -> LandlockSupport {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute pointer, size 0 and the VERSION flag the call only returns
    // the ABI version (or fails); no memory is passed.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if v > 0 {
        return LandlockSupport::Abi(v as u32);
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EOPNOTSUPP) => LandlockSupport::NotEnabled,
        _ => LandlockSupport::NotBuilt,
    }
}

/// Rights on a directory shared read-only.
fn read_only_dir() -> BitFlags<AccessFs> {
    AccessFs::ReadFile | AccessFs::ReadDir
}

/// Rights on a directory shared read-write: everything but executing, creating device nodes
/// and device ioctls. REFER lets renames and links cross directories inside (and between)
/// writable shares; it never reaches a place without these rights.
fn writable_dir() -> BitFlags<AccessFs> {
    AccessFs::from_all(POLICY_ABI)
        & !(AccessFs::Execute | AccessFs::MakeChar | AccessFs::MakeBlock | AccessFs::IoctlDev)
}

/// `/proc/self`, opened once and kept open for the life of the process. A rule names an inode,
/// and procfs may build a new inode for `/proc/<pid>` once its dentry has been reclaimed; the
/// open descriptor keeps the dentry, and so the rule's inode, the one lookups find. None
/// without procfs.
fn proc_self() -> Option<&'static OwnedFd> {
    static PROC_SELF: OnceLock<Option<OwnedFd>> = OnceLock::new();
    PROC_SELF
        .get_or_init(|| open_path(Path::new("/proc/self")).ok())
        .as_ref()
}

/// An `O_PATH` descriptor naming `path` for a rule.
fn open_path(path: &Path) -> Result<OwnedFd, SandboxError> {
    File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(path)
        .map(OwnedFd::from)
        .map_err(|e| path_error(path, e))
}

fn landlock_error(e: impl fmt::Display) -> SandboxError {
    SandboxError::Landlock(e.to_string())
}

/// Adds a rule allowing `access` beneath (or on) `path`.
fn allow(
    ruleset: RulesetCreated,
    path: &Path,
    access: BitFlags<AccessFs>,
) -> Result<RulesetCreated, SandboxError> {
    let fd = open_path(path)?;
    ruleset
        .add_rule(landlock::PathBeneath::new(fd, access))
        .map_err(|e| landlock_error(format!("{}: {e}", path.display())))
}

/// Builds the ruleset for `policy` (without applying it).
fn ruleset(policy: &Policy) -> Result<RulesetCreated, SandboxError> {
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(POLICY_ABI))
        .and_then(|r| r.handle_access(AccessNet::from_all(POLICY_ABI)))
        .and_then(|r| r.scope(Scope::from_all(POLICY_ABI)))
        .and_then(|r| r.create())
        .map_err(landlock_error)?;
    // The monitor's own needs; one that does not exist here is reported later by whoever
    // opens it (a missing /dev/kvm is the VM's error to explain), not by the sandbox.
    let kvm = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::IoctlDev;
    for (path, access) in [(KVM_DEVICE, kvm), (CPUINFO, AccessFs::ReadFile.into())] {
        if Path::new(path).exists() {
            ruleset = allow(ruleset, Path::new(path), access)?;
        }
    }
    if let Some(proc_self) = proc_self() {
        ruleset = ruleset
            .add_rule(landlock::PathBeneath::new(
                proc_self,
                AccessFs::ReadFile | AccessFs::ReadDir,
            ))
            .map_err(|e| landlock_error(format!("/proc/self: {e}")))?;
    }
    for file in &policy.read_files {
        ruleset = allow(ruleset, file, AccessFs::ReadFile.into())?;
    }
    for share in &policy.shares {
        let access = if share.writable {
            writable_dir()
        } else {
            read_only_dir()
        };
        ruleset = allow(ruleset, &share.dir, access)?;
    }
    for file in &policy.write_files {
        ruleset = allow(ruleset, file, AccessFs::WriteFile | AccessFs::Truncate)?;
    }
    Ok(ruleset)
}

/// Restricts the calling thread, and the threads it creates from now on, to `policy`.
pub(super) fn restrict(policy: &Policy) -> Result<LandlockOutcome, SandboxError> {
    let support = support();
    let LandlockSupport::Abi(abi) = support else {
        return Ok(LandlockOutcome::Unavailable(support));
    };
    let status: RestrictionStatus = ruleset(policy)?.restrict_self().map_err(landlock_error)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockOutcome::Enforced {
            abi,
            complete: true,
        },
        RulesetStatus::PartiallyEnforced => LandlockOutcome::Enforced {
            abi,
            complete: false,
        },
        _ => LandlockOutcome::Unavailable(support),
    })
}
