//! The seccomp half of the sandbox: one system call allowlist per [`ThreadRole`], compiled to
//! BPF once, by the first thread that takes the role, and loaded by each thread for itself.
//!
//! Shape of the lists: a common base every thread needs (memory, futexes, time, its own exit,
//! writes to descriptors it already holds), plus what the role does:
//!
//! - vCPU: `ioctl` limited to KVM_RUN and the register reads of error reports; starting the
//!   virtio device threads (`clone` only with `CLONE_THREAD`, eventfds, the new thread's
//!   start-up and its `seccomp` call). Filters are inherited and stack, so a device thread runs
//!   under the vCPU list *and* the device list: the vCPU list contains the device list.
//! - device: `poll` on its eventfds; no `ioctl`, no `open`.
//! - event loop: `epoll_*`.
//! - signal waiter: `rt_sigtimedwait`.
//! - 9p worker: the file server's calls (`openat`/`openat2`, `*at` creation, rename, link,
//!   unlink, attributes, `pread`/`pwrite`, xattrs); no `ioctl` at all. Landlock bounds the
//!   paths.
//! - block worker: `pread`/`preadv` on the disk images it already holds, and `pwrite`/`pwritev`/
//!   `fdatasync` for writable disks; nothing that opens or changes a file's name or attributes.
//!   The write calls are in the one list for every disk: a read-only image is opened
//!   `O_RDONLY`, so the kernel refuses a write to it (EBADF) whatever the filter says.
//! - loader: `pread` on the kernel and initrd files it was handed, into guest memory.
//! - main: opening files for the report (`/proc/self/*`, the JSON file; Landlock bounds the
//!   paths) and the terminal ioctls that restore stdin's mode.
//!
//! No list has `execve`, `socket`, `connect`, `ptrace`, `mount`, `unshare`, `bpf`, `fork`...:
//! the monitor never needs them once set up. `mmap` and `mprotect` never get `PROT_EXEC`, and
//! `tgkill` only reaches this process's threads.
//!
//! One exception to "forbidden stops the process": glibc's malloc opens
//! `/proc/sys/vm/overcommit_memory` the first time it shrinks a thread's heap, from whichever
//! thread happens to free memory. So the roles that never open files answer `open`/`openat`
//! with EACCES (the answer Landlock would give) instead of stopping; nothing is opened either way.
//!
//! `clone3` hides its flags in memory a filter cannot read, so a process-wide filter installed
//! with the sandbox answers it with ENOSYS; glibc then falls back to `clone`, whose flags the
//! vCPU filter checks.

use super::{SandboxError, ThreadRole};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;
use std::io;
use std::sync::OnceLock;

/// One argument check (`arg` is the argument's index).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ArgCheck {
    /// The argument's low 32 bits equal `value`.
    Equals { arg: u8, value: u64 },
    /// The argument's bits under `mask` equal `value`.
    Masked { arg: u8, mask: u64, value: u64 },
}

/// A system call's allowance: any arguments (None), or one of several lists of checks that must
/// all hold.
pub(super) type Allowance = Option<Vec<Vec<ArgCheck>>>;

/// A role's allowlist, by system call number, and the calls it refuses with EACCES instead of
/// stopping the process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Allowlist(pub(super) BTreeMap<i64, Allowance>, pub(super) Vec<i64>);

impl Allowlist {
    fn allow(&mut self, syscalls: &[libc::c_long]) {
        for &nr in syscalls {
            self.0.insert(nr, None);
        }
    }

    fn allow_if(&mut self, nr: libc::c_long, checks: &[ArgCheck]) {
        // None: already allowed with any arguments.
        if let Some(alternatives) = self.0.entry(nr).or_insert_with(|| Some(Vec::new())) {
            if !alternatives.iter().any(|a| a == checks) {
                alternatives.push(checks.to_vec());
            }
        }
    }

    /// Answers `syscalls` with EACCES (a second filter does; this one lets them through to it).
    fn refuse_quietly(&mut self, syscalls: &[libc::c_long]) {
        self.allow(syscalls);
        self.1.extend_from_slice(syscalls);
    }

    /// Whether `nr` is allowed with some arguments (and not refused quietly).
    #[cfg(test)]
    pub(super) fn contains(&self, nr: libc::c_long) -> bool {
        self.0.contains_key(&nr) && !self.1.contains(&nr)
    }

    /// The filter answering the quietly refused calls with EACCES, if there are any.
    fn to_refusal_filter(&self, role: ThreadRole) -> Result<Option<BpfProgram>, SandboxError> {
        if self.1.is_empty() {
            return Ok(None);
        }
        let rules = self.1.iter().map(|&nr| (nr, Vec::new())).collect();
        SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
            target_arch(role)?,
        )
        .and_then(BpfProgram::try_from)
        .map(Some)
        .map_err(|e| SandboxError::Filter {
            role: role.name(),
            reason: e.to_string(),
        })
    }

    fn to_filter(&self, role: ThreadRole) -> Result<BpfProgram, SandboxError> {
        let bug = |e: seccompiler::BackendError| SandboxError::Filter {
            role: role.name(),
            reason: e.to_string(),
        };
        let mut rules = BTreeMap::new();
        for (&nr, allowance) in &self.0 {
            let chain = match allowance {
                None => Vec::new(),
                Some(alternatives) => alternatives
                    .iter()
                    .map(|checks| {
                        let conditions = checks
                            .iter()
                            .map(|c| c.condition())
                            .collect::<Result<Vec<_>, _>>()?;
                        SeccompRule::new(conditions)
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(bug)?,
            };
            rules.insert(nr, chain);
        }
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Trap,
            SeccompAction::Allow,
            target_arch(role)?,
        )
        .map_err(bug)?;
        BpfProgram::try_from(filter).map_err(|e| SandboxError::Filter {
            role: role.name(),
            reason: e.to_string(),
        })
    }
}

impl ArgCheck {
    fn condition(&self) -> Result<SeccompCondition, seccompiler::BackendError> {
        match *self {
            ArgCheck::Equals { arg, value } => {
                SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
            }
            ArgCheck::Masked { arg, mask, value } => SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(mask),
                value,
            ),
        }
    }
}

fn target_arch(role: ThreadRole) -> Result<TargetArch, SandboxError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(|e| SandboxError::Filter {
        role: role.name(),
        reason: e.to_string(),
    })
}

fn equals(arg: u8, value: u64) -> ArgCheck {
    ArgCheck::Equals { arg, value }
}

/// The protection argument `arg` does not ask for executable memory.
fn not_executable(arg: u8) -> ArgCheck {
    ArgCheck::Masked {
        arg,
        mask: libc::PROT_EXEC as u64,
        value: 0,
    }
}

// KVM ioctl request numbers (linux/kvm.h): _IO(KVMIO, nr) and _IOR(KVMIO, nr, type).
const KVMIO: u64 = 0xae;
const fn kvm_io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
const fn kvm_ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
pub(super) const KVM_RUN: u64 = kvm_io(0x80);
pub(super) const KVM_GET_REGS: u64 = kvm_ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
pub(super) const KVM_GET_SREGS: u64 = kvm_ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());

/// What every thread needs: memory, futexes, time, signal returns, its own exit, reads and
/// writes on descriptors it already holds (stderr for messages), and `abort`.
fn base(list: &mut Allowlist, pid: u32) {
    use libc::*;
    list.allow(&[
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_close,
        SYS_futex,
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        SYS_brk,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_sigaltstack,
        SYS_clock_gettime,
        SYS_clock_getres,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_sched_yield,
        SYS_sched_getaffinity,
        SYS_getrandom,
        SYS_gettid,
        SYS_getpid,
        SYS_rseq,
        SYS_restart_syscall,
        SYS_exit,
        SYS_exit_group,
    ]);
    list.allow_if(SYS_mmap, &[not_executable(2)]);
    list.allow_if(SYS_mprotect, &[not_executable(2)]);
    // Kicks between our own threads and abort(); never another process.
    list.allow_if(SYS_tgkill, &[equals(0, u64::from(pid))]);
    // A crash stays a crash: the Rust runtime's SIGSEGV/SIGBUS handler restores the default
    // action before the fault repeats (and then kills the process as it should).
    for signal in [SIGSEGV, SIGBUS] {
        list.allow_if(SYS_rt_sigaction, &[equals(0, signal as u64)]);
    }
}

/// Starting a thread, and what the new thread does before its own filter is in place.
fn thread_start(list: &mut Allowlist) {
    use libc::*;
    list.allow_if(
        SYS_clone,
        &[ArgCheck::Masked {
            arg: 0,
            mask: CLONE_THREAD as u64,
            value: CLONE_THREAD as u64,
        }],
    );
    // Always answered ENOSYS by the process-wide filter (see the module docs).
    list.allow(&[SYS_clone3, SYS_set_robust_list]);
    list.allow_if(SYS_prctl, &[equals(0, PR_SET_NAME as u64)]);
    list.allow_if(
        SYS_seccomp,
        &[equals(0, u64::from(SECCOMP_SET_MODE_FILTER)), equals(1, 0)],
    );
    // The device thread's eventfds.
    list.allow(&[SYS_eventfd2, SYS_dup, SYS_fcntl]);
}

fn device(list: &mut Allowlist) {
    list.allow(&[libc::SYS_poll, libc::SYS_ppoll]);
}

fn vcpu(list: &mut Allowlist) {
    for request in [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS] {
        list.allow_if(libc::SYS_ioctl, &[equals(1, request)]);
    }
    // A vCPU starts device threads, which inherit this filter under their own.
    thread_start(list);
    device(list);
}

fn event_loop(list: &mut Allowlist) {
    use libc::*;
    list.allow(&[SYS_epoll_wait, SYS_epoll_pwait, SYS_epoll_ctl]);
}

fn signal_waiter(list: &mut Allowlist) {
    list.allow(&[libc::SYS_rt_sigtimedwait]);
}

fn p9_worker(list: &mut Allowlist, grants: Grants) {
    use libc::*;
    if grants.chown {
        // Passthrough ownership, asked for explicitly by a root user: a guest's chown reaches
        // the host file (always through the fid's own fd, AT_EMPTY_PATH).
        list.allow(&[SYS_fchown, SYS_fchownat]);
    }
    list.allow(&[
        SYS_openat,
        SYS_openat2,
        SYS_newfstatat,
        SYS_fstat,
        SYS_statx,
        SYS_fstatfs,
        SYS_lseek,
        SYS_getdents64,
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_preadv2,
        SYS_pwritev2,
        SYS_readlinkat,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_statfs,
        SYS_mkdirat,
        SYS_mknodat,
        SYS_symlinkat,
        SYS_linkat,
        SYS_unlinkat,
        SYS_renameat,
        SYS_renameat2,
        SYS_fchmod,
        SYS_fchmodat,
        SYS_fchmodat2,
        // No fchown/fchownat unless granted: in the default mapped ownership mode a guest's
        // chown only changes its own view (an xattr), so even a fooled worker cannot give a
        // host file to root or anyone else. Landlock does not cover chown; this does.
        SYS_utimensat,
        SYS_fsync,
        SYS_fdatasync,
        SYS_ftruncate,
        SYS_fallocate,
        SYS_fcntl,
        SYS_dup,
        SYS_dup3,
        SYS_fgetxattr,
        SYS_getxattr,
        SYS_lgetxattr,
        SYS_fsetxattr,
        SYS_setxattr,
        SYS_lsetxattr,
        SYS_flistxattr,
        SYS_listxattr,
        SYS_llistxattr,
        SYS_fremovexattr,
        SYS_removexattr,
        SYS_lremovexattr,
    ]);
}

fn block_worker(list: &mut Allowlist) {
    use libc::*;
    list.allow(&[
        SYS_pread64,
        SYS_preadv,
        SYS_preadv2,
        SYS_pwrite64,
        SYS_pwritev,
        SYS_pwritev2,
        SYS_fdatasync,
        SYS_fsync,
    ]);
}

fn loader(list: &mut Allowlist) {
    list.allow(&[libc::SYS_pread64]);
}

fn main_thread(list: &mut Allowlist) {
    use libc::*;
    // The report: /proc/self/{smaps,status}, /proc/cpuinfo and the JSON file.
    list.allow(&[
        SYS_openat,
        SYS_newfstatat,
        SYS_fstat,
        SYS_statx,
        SYS_lseek,
        SYS_fcntl,
        // The run record's page-fault counts (RUSAGE_SELF).
        SYS_getrusage,
    ]);
    // Restoring the terminal mode of stdin.
    for request in [TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ] {
        list.allow_if(SYS_ioctl, &[equals(1, request)]);
    }
}

/// What a policy adds to the fixed allowlists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Grants {
    /// The 9p workers may change a host file's owner (passthrough ownership).
    pub(super) chown: bool,
}

/// The allowlist of `role` in the process `pid`.
pub(super) fn allowlist(role: ThreadRole, pid: u32, grants: Grants) -> Allowlist {
    let mut list = Allowlist::default();
    base(&mut list, pid);
    match role {
        ThreadRole::Main => main_thread(&mut list),
        ThreadRole::Vcpu => vcpu(&mut list),
        ThreadRole::Device => device(&mut list),
        ThreadRole::EventLoop => event_loop(&mut list),
        ThreadRole::SignalWaiter => signal_waiter(&mut list),
        ThreadRole::P9Worker => p9_worker(&mut list, grants),
        ThreadRole::BlockWorker => block_worker(&mut list),
        ThreadRole::Loader => loader(&mut list),
    }
    if !matches!(role, ThreadRole::Main | ThreadRole::P9Worker) {
        // glibc's malloc may probe /proc/sys/vm/overcommit_memory from any thread.
        list.refuse_quietly(&[libc::SYS_open, libc::SYS_openat]);
    }
    list
}

/// Loads `program` on the calling thread (for good).
fn load(program: &BpfProgram) -> io::Result<()> {
    let len = u16::try_from(program.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "filter too long"))?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: `fprog` points at `program`'s instructions (seccompiler's sock_filter has the
    // kernel's layout), which outlive the call; the kernel copies the program and keeps no
    // pointer. no_new_privs is set by `install` before any filter is loaded.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            0,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether the kernel has seccomp filters with the trap action.
pub(super) fn trap_filters_supported() -> bool {
    let action: u32 = libc::SECCOMP_RET_TRAP;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL only reads the u32 it is given; it changes nothing.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_GET_ACTION_AVAIL,
            0,
            &action as *const u32,
        )
    };
    r == 0
}

/// One role's compiled filters: its allowlist, and its quiet refusals if any.
type RoleFilters = (BpfProgram, Option<BpfProgram>);

/// Compiles `role`'s filters for the process `pid`.
fn compile_role(role: ThreadRole, pid: u32, grants: Grants) -> Result<RoleFilters, SandboxError> {
    let list = allowlist(role, pid, grants);
    Ok((list.to_filter(role)?, list.to_refusal_filter(role)?))
}

/// The process-wide `clone3` filter, and every role's filters, each compiled the first time a
/// thread takes the role: on that thread, so most of the compiling runs beside the thread that
/// sets the VM up instead of before it. Compiling depends only on the fixed lists (every role
/// compiles, see the tests), so a failure would be a bootbox bug, reported when the role is
/// taken.
pub(super) struct Filters {
    pid: u32,
    grants: Grants,
    roles: [OnceLock<Result<RoleFilters, String>>; ThreadRole::ALL.len()],
    no_clone3: BpfProgram,
}

impl Filters {
    pub(super) fn compile(grants: Grants) -> Result<Filters, SandboxError> {
        let role = ThreadRole::Main;
        let no_clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            target_arch(role)?,
        )
        .and_then(BpfProgram::try_from)
        .map_err(|e| SandboxError::Filter {
            role: "process-wide clone3",
            reason: e.to_string(),
        })?;
        Ok(Filters {
            pid: std::process::id(),
            grants,
            roles: std::array::from_fn(|_| OnceLock::new()),
            no_clone3,
        })
    }

    /// Loads the `clone3` filter on the calling thread; threads it creates inherit it.
    pub(super) fn apply_process_wide(&self) -> io::Result<()> {
        load(&self.no_clone3)
    }

    /// Loads `role`'s filters on the calling thread (compiling them first if no thread took
    /// the role before).
    pub(super) fn apply(&self, role: ThreadRole) -> io::Result<()> {
        let compiled = self.roles[role.index()]
            .get_or_init(|| compile_role(role, self.pid, self.grants).map_err(|e| e.to_string()));
        let (allowlist, refusals) = compiled
            .as_ref()
            .map_err(|reason| io::Error::other(reason.clone()))?;
        // The refusals first: once the allowlist is in place, `seccomp` itself is forbidden.
        refusals.as_ref().map_or(Ok(()), load)?;
        load(allowlist)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libc::*;

    const PID: u32 = 4242;

    fn list(role: ThreadRole) -> Allowlist {
        allowlist(role, PID, Grants::default())
    }

    #[test]
    fn every_role_compiles() {
        Filters::compile(Grants::default()).unwrap();
        for grants in [Grants::default(), Grants { chown: true }] {
            for role in ThreadRole::ALL {
                let (allowlist, refusals) = compile_role(role, PID, grants).unwrap();
                assert!(!allowlist.is_empty(), "{role:?}");
                assert_eq!(refusals.is_some(), !list(role).1.is_empty(), "{role:?}");
            }
        }
    }

    #[test]
    fn no_role_may_run_programs_use_the_network_or_escape_its_namespaces() {
        let forbidden = [
            // Nor give a host file to another owner (Landlock does not cover chown).
            SYS_chown,
            SYS_fchown,
            SYS_fchownat,
            SYS_lchown,
            SYS_execve,
            SYS_execveat,
            SYS_fork,
            SYS_vfork,
            SYS_socket,
            SYS_socketpair,
            SYS_connect,
            SYS_bind,
            SYS_listen,
            SYS_accept4,
            SYS_sendmsg,
            SYS_ptrace,
            SYS_process_vm_readv,
            SYS_process_vm_writev,
            SYS_mount,
            SYS_umount2,
            SYS_pivot_root,
            SYS_chroot,
            SYS_unshare,
            SYS_setns,
            SYS_kexec_load,
            SYS_kexec_file_load,
            SYS_bpf,
            SYS_init_module,
            SYS_finit_module,
            SYS_open_by_handle_at,
            SYS_name_to_handle_at,
            SYS_perf_event_open,
            SYS_userfaultfd,
            SYS_keyctl,
            SYS_kill,
            SYS_setuid,
        ];
        for role in ThreadRole::ALL {
            let list = list(role);
            for nr in forbidden {
                assert!(!list.contains(nr), "{role:?} allows system call {nr}");
            }
        }
    }

    #[test]
    fn executable_memory_and_foreign_signals_are_refused_everywhere() {
        for role in ThreadRole::ALL {
            let list = list(role);
            for nr in [SYS_mmap, SYS_mprotect] {
                assert_eq!(list.0[&nr], Some(vec![vec![not_executable(2)]]), "{role:?}");
            }
            assert_eq!(
                list.0[&SYS_tgkill],
                Some(vec![vec![equals(0, u64::from(PID))]])
            );
            // Handlers only go back to the default action, for the two fatal faults.
            assert_eq!(
                list.0[&SYS_rt_sigaction],
                Some(vec![
                    vec![equals(0, SIGSEGV as u64)],
                    vec![equals(0, SIGBUS as u64)]
                ])
            );
        }
    }

    #[test]
    fn only_vcpus_start_threads_and_only_as_threads() {
        for role in ThreadRole::ALL {
            let list = list(role);
            assert_eq!(
                list.contains(SYS_clone),
                role == ThreadRole::Vcpu,
                "{role:?}"
            );
        }
        let clone_flags = list(ThreadRole::Vcpu).0[&SYS_clone].clone().unwrap();
        assert_eq!(
            clone_flags,
            vec![vec![ArgCheck::Masked {
                arg: 0,
                mask: CLONE_THREAD as u64,
                value: CLONE_THREAD as u64
            }]]
        );
    }

    /// A device thread is started by a vCPU and runs under both filters: everything a device
    /// thread may do must pass the vCPU filter too.
    #[test]
    fn the_vcpu_list_covers_the_device_threads_it_starts() {
        let vcpu = list(ThreadRole::Vcpu);
        for (nr, allowance) in &list(ThreadRole::Device).0 {
            match (vcpu.0.get(nr), allowance) {
                (Some(None), _) => {}
                (Some(Some(v)), Some(d)) => {
                    assert!(d.iter().all(|alt| v.contains(alt)), "system call {nr}")
                }
                (other, _) => panic!("system call {nr}: vCPU allows {other:?}"),
            }
        }
        let device = list(ThreadRole::Device);
        assert!(vcpu.1.iter().all(|nr| device.1.contains(nr)), "{vcpu:?}");
    }

    #[test]
    fn ioctls_are_limited_by_request() {
        let requests = |role| -> Vec<u64> {
            match list(role).0.get(&SYS_ioctl) {
                None => Vec::new(),
                Some(None) => panic!("{role:?} allows every ioctl"),
                Some(Some(alts)) => alts
                    .iter()
                    .map(|checks| match checks.as_slice() {
                        [ArgCheck::Equals { arg: 1, value }] => *value,
                        other => panic!("{role:?}: unexpected ioctl check {other:?}"),
                    })
                    .collect(),
            }
        };
        assert_eq!(
            requests(ThreadRole::Vcpu),
            [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS]
        );
        for role in [
            ThreadRole::Device,
            ThreadRole::EventLoop,
            ThreadRole::SignalWaiter,
            ThreadRole::P9Worker,
            ThreadRole::BlockWorker,
            ThreadRole::Loader,
        ] {
            assert!(requests(role).is_empty(), "{role:?}");
        }
        assert!(!requests(ThreadRole::Main).contains(&KVM_RUN));
    }

    #[test]
    fn kvm_request_numbers_match_the_kernel_headers() {
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
    }

    #[test]
    fn only_passthrough_ownership_lets_the_file_server_chown() {
        let chowns = [SYS_chown, SYS_fchown, SYS_fchownat, SYS_lchown];
        let granted = Grants { chown: true };
        for role in ThreadRole::ALL {
            for grants in [Grants::default(), granted] {
                let list = allowlist(role, PID, grants);
                for nr in chowns {
                    let allowed = list.0.contains_key(&nr);
                    let expected = role == ThreadRole::P9Worker
                        && grants.chown
                        && (nr == SYS_fchown || nr == SYS_fchownat);
                    assert_eq!(allowed, expected, "{role:?} {grants:?} syscall {nr}");
                }
            }
        }
    }

    #[test]
    fn only_the_file_server_changes_files() {
        for nr in [
            SYS_mkdirat,
            SYS_unlinkat,
            SYS_renameat2,
            SYS_linkat,
            SYS_symlinkat,
        ] {
            for role in ThreadRole::ALL {
                assert_eq!(
                    list(role).contains(nr),
                    role == ThreadRole::P9Worker,
                    "{role:?} / {nr}"
                );
            }
        }
        for role in [
            ThreadRole::Vcpu,
            ThreadRole::Device,
            ThreadRole::EventLoop,
            ThreadRole::SignalWaiter,
            ThreadRole::BlockWorker,
            ThreadRole::Loader,
        ] {
            let list = list(role);
            assert!(!list.contains(SYS_openat), "{role:?} opens files");
            assert_eq!(list.1, [SYS_open, SYS_openat], "{role:?}");
        }
        for role in [ThreadRole::Main, ThreadRole::P9Worker] {
            assert!(list(role).contains(SYS_openat) && list(role).1.is_empty());
        }
    }

    #[test]
    fn the_loader_only_reads_what_it_holds() {
        let loader = list(ThreadRole::Loader);
        assert!(loader.contains(SYS_pread64));
        for nr in [SYS_pwrite64, SYS_openat, SYS_ioctl, SYS_clone, SYS_fsync] {
            assert!(!loader.contains(nr), "the loader may make system call {nr}");
        }
    }

    #[test]
    fn block_workers_only_read_and_write_what_they_hold() {
        let block = list(ThreadRole::BlockWorker);
        for nr in [
            SYS_pread64,
            SYS_preadv,
            SYS_pwrite64,
            SYS_pwritev,
            SYS_fdatasync,
        ] {
            assert!(block.contains(nr), "{nr}");
        }
        for nr in [
            SYS_openat,
            SYS_unlinkat,
            SYS_renameat2,
            SYS_ftruncate,
            SYS_fchmod,
        ] {
            assert!(!block.contains(nr), "{nr}");
        }
        // Nothing beyond the common base but the image I/O calls.
        let vcpu_free = list(ThreadRole::SignalWaiter);
        let extra: Vec<i64> = block
            .0
            .keys()
            .filter(|nr| !vcpu_free.0.contains_key(nr))
            .copied()
            .collect();
        assert_eq!(extra.len(), 8, "{extra:?}");
    }
}
