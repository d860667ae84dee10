//! The monitor confines itself, so that a monitor fooled by its guest (a bug in a device model
//! or in the 9p server) can still do no harm outside what the run was given.
//!
//! This module owns three kernel mechanisms and when they are applied:
//!
//! - **no_new_privs** (`PR_SET_NO_NEW_PRIVS`) for the whole process, which also lets an
//!   unprivileged process install the other two;
//! - **Landlock** ([`Policy`], applied by [`install`]): the process may read only the files it
//!   was given (kernel, initrd parts), read each share and write only the writable ones, open
//!   `/dev/kvm`, read its own `/proc/self` entries and `/proc/cpuinfo` (the run report) and write
//!   the report files named in the policy. Nothing else, so an escape through a path-resolution
//!   bug fails at the kernel. Rights the running kernel does not know are dropped (best effort):
//!   every kernel with Landlock still gets what it supports;
//! - **seccomp filters per thread** ([`enter_thread`]): every thread of the monitor declares its
//!   [`ThreadRole`] first thing and gets that role's system call allowlist. A forbidden call
//!   stops the whole process with a report naming the thread and the call (see `sigsys`).
//!
//! Ordering is the caller's part: [`install`] must run on the thread that will create all the
//! others, before it creates any (Landlock binds the calling thread and the threads it creates
//! afterwards, not threads that already exist). Filters are inherited too: a thread started by
//! a vCPU (a virtio device thread, on DRIVER_OK) runs under the vCPU filter *and* its own, so the
//! vCPU allowlist includes what device threads need (see `seccomp`).
//!
//! When [`install`] was not called (`--no-sandbox`, the unit tests), [`enter_thread`] does
//! nothing.

mod landlock;
mod seccomp;
mod sigsys;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use self::landlock::LandlockSupport;

/// What a monitor thread does, which decides the system calls it may make.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadRole {
    /// The thread that set the VM up and then waits for it, stops the other threads and
    /// writes the report.
    Main,
    /// A vCPU: KVM_RUN and the device emulation behind port and MMIO exits; it also starts the
    /// virtio device threads when the guest's driver activates a device.
    Vcpu,
    /// A virtio device's event thread: waits for queue notifications and moves data between
    /// guest memory and already-open host descriptors.
    Device,
    /// The monitor's event loop: stop requests, the run timeout and host stdin forwarding.
    EventLoop,
    /// The launcher's thread that waits for SIGINT/SIGTERM/SIGHUP and asks the VM to stop.
    SignalWaiter,
    /// A 9p file-server worker: the only role that opens, creates and changes files (inside
    /// the shares, which Landlock enforces).
    P9Worker,
    /// A virtio-blk worker: reads (and for a writable disk writes and flushes) the disk images
    /// through descriptors opened before the sandbox; it opens nothing. Its own role rather
    /// than the 9p worker's, so a fooled block worker cannot open, create or rename files.
    BlockWorker,
    /// The kernel loader: copies the kernel and initrd files, opened before it starts, into
    /// guest memory while the VM is being created (`pread` on those descriptors only).
    Loader,
}

impl ThreadRole {
    /// Every role, in a fixed order.
    pub const ALL: [ThreadRole; 8] = [
        ThreadRole::Main,
        ThreadRole::Vcpu,
        ThreadRole::Device,
        ThreadRole::EventLoop,
        ThreadRole::SignalWaiter,
        ThreadRole::P9Worker,
        ThreadRole::BlockWorker,
        ThreadRole::Loader,
    ];

    fn index(self) -> usize {
        self as usize
    }

    /// A short name for messages ("vcpu", "p9-worker").
    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::Main => "main",
            ThreadRole::Vcpu => "vcpu",
            ThreadRole::Device => "device",
            ThreadRole::EventLoop => "event-loop",
            ThreadRole::SignalWaiter => "signal-waiter",
            ThreadRole::P9Worker => "p9-worker",
            ThreadRole::BlockWorker => "block-worker",
            ThreadRole::Loader => "loader",
        }
    }
}

/// One shared host directory.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SharedDir {
    dir: PathBuf,
    writable: bool,
}

/// The files the confined process may still use. `/dev/kvm`, `/proc/self` (read) and
/// `/proc/cpuinfo` (read) are always allowed: the monitor itself needs them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    read_files: Vec<PathBuf>,
    shares: Vec<SharedDir>,
    write_files: Vec<PathBuf>,
    seccomp: bool,
    chown: bool,
}

impl Policy {
    /// A policy that allows only what the monitor itself needs, with a seccomp allowlist per
    /// thread.
    pub fn new() -> Self {
        Policy {
            seccomp: true,
            ..Self::default()
        }
    }

    /// Whether every monitor thread also gets its seccomp allowlist (on by default).
    pub fn seccomp(mut self, on: bool) -> Self {
        self.seccomp = on;
        self
    }

    /// Lets the 9p workers change a host file's owner: only for shares served with passthrough
    /// ownership, which a root user asks for explicitly. Off by default.
    pub fn passthrough_ownership(mut self, on: bool) -> Self {
        self.chown = on;
        self
    }

    /// Allows reading one file (the kernel, an initrd part).
    pub fn read_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.read_files.push(path.into());
        self
    }

    /// Allows reading everything beneath `dir`, and with `writable` also creating, changing,
    /// renaming and removing files and directories there. Device nodes can never be created.
    pub fn share(mut self, dir: impl Into<PathBuf>, writable: bool) -> Self {
        self.shares.push(SharedDir {
            dir: dir.into(),
            writable,
        });
        self
    }

    /// Allows writing (and truncating) one existing file, such as a report written after the
    /// run. The file must exist when the policy is installed.
    pub fn write_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.write_files.push(path.into());
        self
    }
}

/// Why the sandbox could not be set up. Missing kernel support is not an error (see
/// [`Report`]); these are.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the sandbox is already installed in this process")]
    AlreadyInstalled,
    #[error("sandbox: cannot open {path} to allow it: {source}")]
    Path {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox: Landlock: {0}")]
    Landlock(String),
    #[error(
        "sandbox: cannot build the {role} system call filter: {reason}; this is a bootbox bug"
    )]
    Filter { role: &'static str, reason: String },
    #[error("sandbox: cannot install the SIGSYS report handler: {0}")]
    SignalHandler(#[source] std::io::Error),
    #[error("sandbox: cannot install the process-wide system call filter: {0}")]
    ProcessFilter(#[source] std::io::Error),
}

/// What [`install`] put in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `PR_SET_NO_NEW_PRIVS` is set.
    pub no_new_privs: bool,
    /// Landlock's state after installing.
    pub landlock: LandlockOutcome,
    /// Threads get their role's seccomp filter in [`enter_thread`].
    pub seccomp: bool,
    /// The policy asked for seccomp filters (so their absence is a shortfall).
    pub seccomp_requested: bool,
}

/// Whether the Landlock policy is in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LandlockOutcome {
    /// Enforced with the rights ABI `abi` knows; `complete` is false when the kernel lacks
    /// some of the rights the policy handles (e.g. truncation before ABI 3).
    Enforced { abi: u32, complete: bool },
    /// Not in force, and why.
    Unavailable(LandlockSupport),
}

impl Report {
    /// One line naming what is missing, or None when everything is in force.
    pub fn shortfall(&self) -> Option<String> {
        let mut missing = Vec::new();
        if let LandlockOutcome::Unavailable(why) = &self.landlock {
            missing.push(format!("no Landlock file confinement ({why})"));
        }
        if self.seccomp_requested && !self.seccomp {
            missing.push("no seccomp system call filters (the kernel lacks them)".to_string());
        }
        if !self.no_new_privs {
            missing.push("no no_new_privs (the kernel lacks it)".to_string());
        }
        (!missing.is_empty()).then(|| {
            format!(
                "the sandbox is incomplete on this kernel: {}; running without",
                missing.join(", ")
            )
        })
    }
}

/// What the running kernel supports (for `doctor`). Changes nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostSupport {
    pub landlock: LandlockSupport,
    /// seccomp filters with the trap action (`SECCOMP_RET_TRAP`).
    pub seccomp_filters: bool,
    /// `PR_SET_NO_NEW_PRIVS`.
    pub no_new_privs: bool,
}

/// Asks the kernel which sandbox mechanisms it has.
pub fn host_support() -> HostSupport {
    // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointers; it returns 0 or 1, or fails with EINVAL
    // on kernels without it.
    let nnp = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    HostSupport {
        landlock: landlock::support(),
        seccomp_filters: seccomp::trap_filters_supported(),
        no_new_privs: nnp >= 0,
    }
}

/// The installed sandbox: the compiled filters, when seccomp is in use.
struct Installed {
    filters: Option<seccomp::Filters>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Confines the process: sets no_new_privs, applies `policy` with Landlock, installs the
/// SIGSYS report handler and the process-wide seccomp filter, and prepares the role filters for
/// [`enter_thread`] (each is compiled by the first thread that takes its role).
///
/// Call it once, on the thread that creates all other threads, before it creates any. What the
/// kernel lacks is left out and said in the [`Report`]; errors are for things that should work
/// (a path in the policy that cannot be opened, a filter that does not build).
pub fn install(policy: &Policy) -> Result<Report, SandboxError> {
    if INSTALLED.get().is_some() {
        return Err(SandboxError::AlreadyInstalled);
    }
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integer arguments.
    let no_new_privs = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } == 0;
    let landlock = landlock::restrict(policy)?;
    let filters = if policy.seccomp && no_new_privs && seccomp::trap_filters_supported() {
        sigsys::install_handler().map_err(SandboxError::SignalHandler)?;
        let filters = seccomp::Filters::compile(seccomp::Grants {
            chown: policy.chown,
        })?;
        filters
            .apply_process_wide()
            .map_err(SandboxError::ProcessFilter)?;
        Some(filters)
    } else {
        None
    };
    let seccomp = filters.is_some();
    INSTALLED
        .set(Installed { filters })
        .map_err(|_| SandboxError::AlreadyInstalled)?;
    Ok(Report {
        no_new_privs,
        landlock,
        seccomp,
        seccomp_requested: policy.seccomp,
    })
}

/// Whether [`install`] ran in this process.
pub fn is_installed() -> bool {
    INSTALLED.get().is_some()
}

/// Declares the calling thread's role; each monitor thread calls it first thing. With the
/// sandbox installed this installs the role's seccomp filter (for good: filters cannot be
/// removed); otherwise it does nothing. If the filter cannot be installed the process stops
/// rather than run a thread unconfined.
pub fn enter_thread(role: ThreadRole) {
    let Some(installed) = INSTALLED.get() else {
        return;
    };
    let Some(filters) = &installed.filters else {
        return;
    };
    let name = std::thread::current()
        .name()
        .map_or_else(|| role.name().to_string(), str::to_string);
    sigsys::set_thread_name(&name);
    if let Err(e) = filters.apply(role) {
        eprintln!(
            "bootbox: seccomp: cannot confine thread '{name}' as {}: {e}; stopping",
            role.name()
        );
        sigsys::exit_now();
    }
}

/// `path` itself, or the reason it cannot be opened as a sandbox rule.
fn path_error(path: &Path, source: std::io::Error) -> SandboxError {
    SandboxError::Path {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests;
