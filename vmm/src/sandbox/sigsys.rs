//! The report of a forbidden system call. Filters answer a call outside the thread's allowlist
//! with `SECCOMP_RET_TRAP`: the kernel raises SIGSYS on that thread with the call's number in
//! `si_syscall`, and the handler here writes one line naming the thread and the call, e.g.
//!
//! ```text
//! bootbox: seccomp: thread 'vcpu0' made forbidden system call 41 (socket); stopping
//! ```
//!
//! then ends the process with status 125 (a launcher failure) through the raw `exit_group`.
//! Everything the handler does is async-signal-safe: a thread-local fixed buffer holding the
//! thread's name (filled by `enter_thread`), formatting into a stack buffer, `write(2)` and
//! `exit_group(2)`, all allowed by every role's filter.

use std::cell::Cell;
use std::io;

/// The exit status after a forbidden system call (bootbox's "the launcher failed").
pub(super) const EXIT_STATUS: i32 = 125;

const NAME_CAP: usize = 48;

thread_local! {
    /// This thread's name, NUL-padded. A const-initialised `Cell` of plain bytes: reading it
    /// from a signal handler neither allocates nor registers a destructor.
    static THREAD_NAME: Cell<[u8; NAME_CAP]> = const { Cell::new([0; NAME_CAP]) };
}

/// Records the calling thread's name for reports.
pub(super) fn set_thread_name(name: &str) {
    let mut buf = [0u8; NAME_CAP];
    let n = name.len().min(NAME_CAP);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD_NAME.with(|c| c.set(buf));
}

/// The `_sigsys` member of `siginfo_t` on 64-bit Linux: after signo, errno, code and padding
/// come the faulting instruction's address, the system call number and the audit arch.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: libc::c_int = 1;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler; SigsysInfo
    // describes its layout for SIGSYS, and we read only integers from it.
    let (code, nr) = unsafe {
        let info = &*(info as *const SigsysInfo);
        (info.code, i64::from(info.syscall))
    };
    let name = THREAD_NAME.try_with(Cell::get).unwrap_or([0; NAME_CAP]);
    let mut buf = [0u8; 256];
    let len = if code == SYS_SECCOMP {
        format_report(&mut buf, &name, nr)
    } else {
        format_stray(&mut buf, &name)
    };
    // SAFETY: writes `len` initialised bytes of a stack buffer to stderr.
    unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len) };
    exit_now();
}

/// Ends the process at once with [`EXIT_STATUS`], running no exit handlers.
pub(super) fn exit_now() -> ! {
    // SAFETY: exit_group takes an integer and does not return.
    unsafe { libc::syscall(libc::SYS_exit_group, EXIT_STATUS) };
    // Unreachable; abort if the kernel returned anyway.
    std::process::abort()
}

/// Installs the SIGSYS handler for the whole process.
pub(super) fn install_handler() -> io::Result<()> {
    // SAFETY: sigaction is plain data; zeroed is a valid empty action that we fill in.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action.sa_mask` is a valid sigset_t to initialise.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a handler that only performs async-signal-safe work (see the module
    // docs); the old action is not needed.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Appends bytes to a fixed buffer, dropping what does not fit.
struct Line<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Line<'_> {
    fn push(&mut self, bytes: &[u8]) -> &mut Self {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    fn number(&mut self, mut v: i64) -> &mut Self {
        if v < 0 {
            self.push(b"-");
            v = -v;
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..])
    }

    fn thread(&mut self, name: &[u8; NAME_CAP]) -> &mut Self {
        let end = name.iter().position(|&b| b == 0).unwrap_or(NAME_CAP);
        if end == 0 {
            self.push(b"thread (unnamed)")
        } else {
            self.push(b"thread '").push(&name[..end]).push(b"'")
        }
    }
}

/// "bootbox: seccomp: thread 'NAME' made forbidden system call NR (NAME); stopping\n" into
/// `buf`; returns its length.
fn format_report(buf: &mut [u8], thread: &[u8; NAME_CAP], nr: i64) -> usize {
    let mut line = Line { buf, len: 0 };
    line.push(b"bootbox: seccomp: ")
        .thread(thread)
        .push(b" made forbidden system call ")
        .number(nr)
        .push(b" (")
        .push(syscall_name(nr).unwrap_or("unknown").as_bytes())
        .push(b"); stopping\n");
    line.len
}

/// A SIGSYS that no filter raised (sent by someone): still stop, saying so.
fn format_stray(buf: &mut [u8], thread: &[u8; NAME_CAP]) -> usize {
    let mut line = Line { buf, len: 0 };
    line.push(b"bootbox: seccomp: ")
        .thread(thread)
        .push(b" received SIGSYS from outside its filter; stopping\n");
    line.len
}

/// The x86-64 system call's name, for reports.
pub(super) fn syscall_name(nr: i64) -> Option<&'static str> {
    SYSCALL_NAMES
        .iter()
        .find(|&&(n, _)| n == nr)
        .and_then(|&(_, name)| name.strip_prefix("SYS_"))
}

/// `(libc::SYS_x, "SYS_x")` for each name given.
macro_rules! syscall_names {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name))),*]
    };
}

/// Number and name of every x86-64 system call the libc crate knows.
#[rustfmt::skip]
static SYSCALL_NAMES: &[(libc::c_long, &str)] = syscall_names![
    SYS_read, SYS_write, SYS_open, SYS_close, SYS_stat, SYS_fstat, SYS_lstat, SYS_poll, SYS_lseek,
    SYS_mmap, SYS_mprotect, SYS_munmap, SYS_brk, SYS_rt_sigaction, SYS_rt_sigprocmask,
    SYS_rt_sigreturn, SYS_ioctl, SYS_pread64, SYS_pwrite64, SYS_readv, SYS_writev, SYS_access,
    SYS_pipe, SYS_select, SYS_sched_yield, SYS_mremap, SYS_msync, SYS_mincore, SYS_madvise,
    SYS_shmget, SYS_shmat, SYS_shmctl, SYS_dup, SYS_dup2, SYS_pause, SYS_nanosleep, SYS_getitimer,
    SYS_alarm, SYS_setitimer, SYS_getpid, SYS_sendfile, SYS_socket, SYS_connect, SYS_accept,
    SYS_sendto, SYS_recvfrom, SYS_sendmsg, SYS_recvmsg, SYS_shutdown, SYS_bind, SYS_listen,
    SYS_getsockname, SYS_getpeername, SYS_socketpair, SYS_setsockopt, SYS_getsockopt, SYS_clone,
    SYS_fork, SYS_vfork, SYS_execve, SYS_exit, SYS_wait4, SYS_kill, SYS_uname, SYS_semget,
    SYS_semop, SYS_semctl, SYS_shmdt, SYS_msgget, SYS_msgsnd, SYS_msgrcv, SYS_msgctl, SYS_fcntl,
    SYS_flock, SYS_fsync, SYS_fdatasync, SYS_truncate, SYS_ftruncate, SYS_getdents, SYS_getcwd,
    SYS_chdir, SYS_fchdir, SYS_rename, SYS_mkdir, SYS_rmdir, SYS_creat, SYS_link, SYS_unlink,
    SYS_symlink, SYS_readlink, SYS_chmod, SYS_fchmod, SYS_chown, SYS_fchown, SYS_lchown, SYS_umask,
    SYS_gettimeofday, SYS_getrlimit, SYS_getrusage, SYS_sysinfo, SYS_times, SYS_ptrace, SYS_getuid,
    SYS_syslog, SYS_getgid, SYS_setuid, SYS_setgid, SYS_geteuid, SYS_getegid, SYS_setpgid,
    SYS_getppid, SYS_getpgrp, SYS_setsid, SYS_setreuid, SYS_setregid, SYS_getgroups, SYS_setgroups,
    SYS_setresuid, SYS_getresuid, SYS_setresgid, SYS_getresgid, SYS_getpgid, SYS_setfsuid,
    SYS_setfsgid, SYS_getsid, SYS_capget, SYS_capset, SYS_rt_sigpending, SYS_rt_sigtimedwait,
    SYS_rt_sigqueueinfo, SYS_rt_sigsuspend, SYS_sigaltstack, SYS_utime, SYS_mknod, SYS_uselib,
    SYS_personality, SYS_ustat, SYS_statfs, SYS_fstatfs, SYS_sysfs, SYS_getpriority,
    SYS_setpriority, SYS_sched_setparam, SYS_sched_getparam, SYS_sched_setscheduler,
    SYS_sched_getscheduler, SYS_sched_get_priority_max, SYS_sched_get_priority_min,
    SYS_sched_rr_get_interval, SYS_mlock, SYS_munlock, SYS_mlockall, SYS_munlockall, SYS_vhangup,
    SYS_modify_ldt, SYS_pivot_root, SYS__sysctl, SYS_prctl, SYS_arch_prctl, SYS_adjtimex,
    SYS_setrlimit, SYS_chroot, SYS_sync, SYS_acct, SYS_settimeofday, SYS_mount, SYS_umount2,
    SYS_swapon, SYS_swapoff, SYS_reboot, SYS_sethostname, SYS_setdomainname, SYS_iopl, SYS_ioperm,
    SYS_init_module, SYS_delete_module, SYS_quotactl, SYS_nfsservctl, SYS_getpmsg, SYS_putpmsg,
    SYS_afs_syscall, SYS_tuxcall, SYS_security, SYS_gettid, SYS_readahead, SYS_setxattr,
    SYS_lsetxattr, SYS_fsetxattr, SYS_getxattr, SYS_lgetxattr, SYS_fgetxattr, SYS_listxattr,
    SYS_llistxattr, SYS_flistxattr, SYS_removexattr, SYS_lremovexattr, SYS_fremovexattr, SYS_tkill,
    SYS_time, SYS_futex, SYS_sched_setaffinity, SYS_sched_getaffinity, SYS_set_thread_area,
    SYS_io_setup, SYS_io_destroy, SYS_io_getevents, SYS_io_submit, SYS_io_cancel,
    SYS_get_thread_area, SYS_lookup_dcookie, SYS_epoll_create, SYS_epoll_ctl_old,
    SYS_epoll_wait_old, SYS_remap_file_pages, SYS_getdents64, SYS_set_tid_address,
    SYS_restart_syscall, SYS_semtimedop, SYS_fadvise64, SYS_timer_create, SYS_timer_settime,
    SYS_timer_gettime, SYS_timer_getoverrun, SYS_timer_delete, SYS_clock_settime, SYS_clock_gettime,
    SYS_clock_getres, SYS_clock_nanosleep, SYS_exit_group, SYS_epoll_wait, SYS_epoll_ctl,
    SYS_tgkill, SYS_utimes, SYS_vserver, SYS_mbind, SYS_set_mempolicy, SYS_get_mempolicy,
    SYS_mq_open, SYS_mq_unlink, SYS_mq_timedsend, SYS_mq_timedreceive, SYS_mq_notify,
    SYS_mq_getsetattr, SYS_kexec_load, SYS_waitid, SYS_add_key, SYS_request_key, SYS_keyctl,
    SYS_ioprio_set, SYS_ioprio_get, SYS_inotify_init, SYS_inotify_add_watch, SYS_inotify_rm_watch,
    SYS_migrate_pages, SYS_openat, SYS_mkdirat, SYS_mknodat, SYS_fchownat, SYS_futimesat,
    SYS_newfstatat, SYS_unlinkat, SYS_renameat, SYS_linkat, SYS_symlinkat, SYS_readlinkat,
    SYS_fchmodat, SYS_faccessat, SYS_pselect6, SYS_ppoll, SYS_unshare, SYS_set_robust_list,
    SYS_get_robust_list, SYS_splice, SYS_tee, SYS_sync_file_range, SYS_vmsplice, SYS_move_pages,
    SYS_utimensat, SYS_epoll_pwait, SYS_signalfd, SYS_timerfd_create, SYS_eventfd, SYS_fallocate,
    SYS_timerfd_settime, SYS_timerfd_gettime, SYS_accept4, SYS_signalfd4, SYS_eventfd2,
    SYS_epoll_create1, SYS_dup3, SYS_pipe2, SYS_inotify_init1, SYS_preadv, SYS_pwritev,
    SYS_rt_tgsigqueueinfo, SYS_perf_event_open, SYS_recvmmsg, SYS_fanotify_init, SYS_fanotify_mark,
    SYS_prlimit64, SYS_name_to_handle_at, SYS_open_by_handle_at, SYS_clock_adjtime, SYS_syncfs,
    SYS_sendmmsg, SYS_setns, SYS_getcpu, SYS_process_vm_readv, SYS_process_vm_writev, SYS_kcmp,
    SYS_finit_module, SYS_sched_setattr, SYS_sched_getattr, SYS_renameat2, SYS_seccomp,
    SYS_getrandom, SYS_memfd_create, SYS_kexec_file_load, SYS_bpf, SYS_execveat, SYS_userfaultfd,
    SYS_membarrier, SYS_mlock2, SYS_copy_file_range, SYS_preadv2, SYS_pwritev2, SYS_pkey_mprotect,
    SYS_pkey_alloc, SYS_pkey_free, SYS_statx, SYS_rseq, SYS_pidfd_send_signal, SYS_io_uring_setup,
    SYS_io_uring_enter, SYS_io_uring_register, SYS_open_tree, SYS_move_mount, SYS_fsopen,
    SYS_fsconfig, SYS_fsmount, SYS_fspick, SYS_pidfd_open, SYS_clone3, SYS_close_range, SYS_openat2,
    SYS_pidfd_getfd, SYS_faccessat2, SYS_process_madvise, SYS_epoll_pwait2, SYS_mount_setattr,
    SYS_quotactl_fd, SYS_landlock_create_ruleset, SYS_landlock_add_rule, SYS_landlock_restrict_self,
    SYS_memfd_secret, SYS_process_mrelease, SYS_futex_waitv, SYS_set_mempolicy_home_node,
    SYS_fchmodat2, SYS_mseal,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> [u8; NAME_CAP] {
        let mut b = [0u8; NAME_CAP];
        b[..s.len()].copy_from_slice(s.as_bytes());
        b
    }

    #[test]
    fn the_report_names_the_thread_and_the_call() {
        let mut buf = [0u8; 256];
        let n = format_report(&mut buf, &name("vcpu0"), libc::SYS_socket);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "bootbox: seccomp: thread 'vcpu0' made forbidden system call 41 (socket); stopping\n"
        );
        let n = format_report(&mut buf, &[0; NAME_CAP], 100_000);
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "bootbox: seccomp: thread (unnamed) made forbidden system call 100000 (unknown); stopping\n"
        );
    }

    #[test]
    fn a_long_report_is_cut_not_overflowed() {
        let mut buf = [0u8; 30];
        let n = format_report(&mut buf, &name(&"x".repeat(NAME_CAP)), 59);
        assert_eq!(n, 30);
        assert!(buf.starts_with(b"bootbox: seccomp: thread 'xxx"));
    }

    #[test]
    fn system_calls_are_named() {
        assert_eq!(syscall_name(libc::SYS_execve), Some("execve"));
        assert_eq!(syscall_name(0), Some("read"));
        assert_eq!(syscall_name(libc::SYS_openat2), Some("openat2"));
        assert_eq!(syscall_name(-1), None);
    }
}
