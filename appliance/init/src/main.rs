//! `bootbox-init`: the static PID 1 of the bootbox appliance.
//!
//! It owns the guest side of the bootbox ABI (the numbers are defined once, with the host's
//! side, in the `guest-abi` crate): it marks boot phases on I/O port 0x610
//! (1 = init started, 2 = shares mounted, 3 = job started, 4 = job finished), mounts the
//! pseudo filesystems and the virtio-9p shares listed in `/bootbox/job` (and, asked to, the
//! filesystems on the virtio disks: see `disks`), runs the job with a
//! clean environment (stdout on `/dev/hvc0`, stderr on `/dev/hvc1`, both raw; stdin
//! `/dev/null`) or an interactive shell on the serial console, reaps every child, syncs, and
//! reports the exit status on I/O port 0x600 (128+signal if killed, 127 command not found,
//! 126 not executable, 125 for any failure of the init itself).

mod disks;
mod warm;

use std::ffi::{CStr, CString};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use guest_abi::jobspec::{self, Job};
use guest_abi::{
    EXIT_PORT, NINEP_MSIZE, PHASE_INIT_STARTED, PHASE_JOB_FINISHED, PHASE_JOB_STARTED, PHASE_PORT,
    PHASE_SHARES_MOUNTED, PORT_SPAN, STATUS_INIT_FAILURE, STATUS_NOT_EXECUTABLE, STATUS_NOT_FOUND,
    STATUS_SIGNAL_BASE,
};

const GUEST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// When this file exists the init runs as a host-side test (PID 1 of a PID namespace in a
/// chroot of the extracted appliance): no port I/O, phases and the exit status are printed on
/// the inherited stderr instead, and the init exits instead of rebooting.
const TEST_MODE_FLAG: &str = "/bootbox/test-mode";
static TEST_MODE: AtomicBool = AtomicBool::new(false);
/// Console fd for init messages (-1 until opened).
static CONSOLE_FD: AtomicI32 = AtomicI32::new(-1);
/// Job stderr fd (hvc1), also used for init messages when open.
static ERR_FD: AtomicI32 = AtomicI32::new(-1);
/// How port writes reach the host: 0 = not set up, 1 = ioperm + `out`, 2 = `/dev/port` fd.
static PORT_MODE: AtomicI32 = AtomicI32::new(0);
static DEVPORT_FD: AtomicI32 = AtomicI32::new(-1);

fn write_all(fd: i32, mut buf: &[u8]) {
    while !buf.is_empty() && fd >= 0 {
        // SAFETY: buf points to buf.len() readable bytes for the duration of the call.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return;
        }
        if n == 0 {
            return;
        }
        buf = &buf[n as usize..];
    }
}

/// Prints an init message on the console and, if open, on the job's stderr channel.
fn say(msg: &str) {
    let line = format!("bootbox-init: {msg}\n");
    let con = CONSOLE_FD.load(Ordering::Relaxed);
    let con = if con >= 0 { con } else { 2 };
    write_all(con, line.as_bytes());
    let err = ERR_FD.load(Ordering::Relaxed);
    if err >= 0 && err != con {
        write_all(err, line.as_bytes());
    }
}

fn setup_ports() {
    // SAFETY: ioperm only changes this process's I/O permission bitmap.
    if unsafe { libc::ioperm(u64::from(EXIT_PORT), u64::from(PORT_SPAN), 1) } == 0 {
        PORT_MODE.store(1, Ordering::Relaxed);
        return;
    }
    // Kernels without CONFIG_X86_IOPL_IOPERM: fall back to /dev/port (CONFIG_DEVPORT).
    let fd = open_path(c"/dev/port", libc::O_WRONLY | libc::O_CLOEXEC);
    if fd >= 0 {
        DEVPORT_FD.store(fd, Ordering::Relaxed);
        PORT_MODE.store(2, Ordering::Relaxed);
    }
}

fn port_out(port: u16, value: u8) {
    match PORT_MODE.load(Ordering::Relaxed) {
        1 => {
            // SAFETY: ioperm granted this process access to ports 0x600..0x620; the write
            // has no memory effects in the guest (the VMM handles it).
            unsafe {
                std::arch::asm!("out dx, al", in("dx") port, in("al") value,
                    options(nomem, nostack, preserves_flags));
            }
        }
        2 => {
            let fd = DEVPORT_FD.load(Ordering::Relaxed);
            // SAFETY: writes one byte from a valid stack variable at offset `port` of /dev/port.
            unsafe { libc::pwrite(fd, (&value as *const u8).cast(), 1, libc::off_t::from(port)) };
        }
        _ => {}
    }
}

fn phase(id: u8) {
    if TEST_MODE.load(Ordering::Relaxed) {
        say(&format!("phase {id}"));
    } else {
        port_out(PHASE_PORT, id);
    }
}

fn open_path(path: &CStr, flags: i32) -> i32 {
    // SAFETY: path is a valid NUL-terminated string.
    unsafe { libc::open(path.as_ptr(), flags, 0o600) }
}

fn errno_str() -> String {
    std::io::Error::last_os_error().to_string()
}

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{s:?} contains a NUL byte"))
}

fn cbytes(b: &[u8]) -> Result<CString, String> {
    CString::new(b).map_err(|_| format!("{:?} contains a NUL byte", String::from_utf8_lossy(b)))
}

fn mkdir_p(path: &str) -> Result<(), String> {
    let mut cur = String::new();
    for comp in path.split('/').filter(|c| !c.is_empty()) {
        cur.push('/');
        cur.push_str(comp);
        let c = cstr(&cur)?;
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::mkdir(c.as_ptr(), 0o755) } != 0
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EEXIST)
        {
            return Err(format!("mkdir {cur}: {}", errno_str()));
        }
    }
    Ok(())
}

fn mount(
    src: &str,
    dir: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    mkdir_p(dir)?;
    let (s, d, t, o) = (cstr(src)?, cstr(dir)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings living across the call.
    let r = unsafe { libc::mount(s.as_ptr(), d.as_ptr(), t.as_ptr(), flags, o.as_ptr().cast()) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            return Ok(());
        }
        return Err(format!("mount {fstype} {src:?} on {dir}: {e}"));
    }
    Ok(())
}

fn mount_basics() -> Result<(), String> {
    let nosuid = libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV;
    if !std::path::Path::new("/proc/self").exists() {
        mount("proc", "/proc", "proc", nosuid, "")?;
    }
    if !std::path::Path::new("/sys/kernel").exists() {
        mount("sysfs", "/sys", "sysfs", nosuid, "")?;
    }
    if !std::path::Path::new("/dev/null").exists() {
        mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    }
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    )?;
    Ok(())
}

fn open_console() {
    if CONSOLE_FD.load(Ordering::Relaxed) >= 0 {
        return;
    }
    if TEST_MODE.load(Ordering::Relaxed) {
        // SAFETY: dup of the inherited stderr; -1 on failure is handled by say().
        CONSOLE_FD.store(
            unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) },
            Ordering::Relaxed,
        );
        return;
    }
    for p in [c"/dev/ttyS0", c"/dev/console"] {
        let fd = open_path(p, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if fd >= 0 {
            CONSOLE_FD.store(fd, Ordering::Relaxed);
            return;
        }
    }
}

/// Opens a virtio-console port for output and puts it in raw mode (no newline translation).
fn open_raw_output(path: &CStr) -> Option<i32> {
    let fd = open_path(path, libc::O_WRONLY | libc::O_NOCTTY | libc::O_CLOEXEC);
    if fd < 0 {
        return None;
    }
    // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open and t is a valid termios to fill / read.
    unsafe {
        if libc::tcgetattr(fd, &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
    Some(fd)
}

fn read_job() -> Result<Job, String> {
    let bytes = std::fs::read(jobspec::JOB_PATH)
        .map_err(|e| format!("cannot read {}: {e}", jobspec::JOB_PATH))?;
    Job::decode(&bytes).map_err(|e| format!("bad {}: {e}", jobspec::JOB_PATH))
}

fn mount_shares(job: &Job) -> Result<(), String> {
    for s in &job.shares {
        let (flags, cache) = if s.read_only {
            (libc::MS_RDONLY, "loose")
        } else {
            (0, "none")
        };
        let opts = format!("trans=virtio,version=9p2000.L,msize={NINEP_MSIZE},cache={cache}");
        mount(&s.tag, &s.mount_point, "9p", flags, &opts)?;
    }
    Ok(())
}

/// Everything the child needs, prepared before `fork` so the child does not allocate.
struct Exec {
    /// Candidate full paths to try in order (one if argv[0] has a slash).
    candidates: Vec<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: Option<CString>,
    name: String,
    interactive: bool,
}

fn prepare_exec(job: &Job) -> Result<Exec, String> {
    let interactive = job.argv.is_empty();
    // Arguments are bytes: a file name need not be UTF-8.
    let argv_s: Vec<Vec<u8>> = if interactive {
        let shell = if std::path::Path::new("/bin/bash").exists() || find_in_path("bash") {
            "bash"
        } else {
            "sh"
        };
        vec![shell.as_bytes().to_vec()]
    } else {
        job.argv.clone()
    };
    let name_bytes = argv_s[0].clone();
    let name = String::from_utf8_lossy(&name_bytes).into_owned();
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), GUEST_PATH.into()),
        ("HOME".into(), "/root".into()),
    ];
    if interactive {
        env.push(("TERM".into(), "linux".into()));
    }
    for (k, v) in &job.env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let candidates = if name_bytes.contains(&b'/') {
        vec![cbytes(&name_bytes)?]
    } else {
        path_var
            .split(':')
            .map(|d| if d.is_empty() { "." } else { d })
            .map(|d| cbytes(&[d.as_bytes(), b"/", &name_bytes].concat()))
            .collect::<Result<_, _>>()?
    };
    Ok(Exec {
        candidates,
        argv: argv_s.iter().map(|a| cbytes(a)).collect::<Result<_, _>>()?,
        envp: env
            .iter()
            .map(|(k, v)| cstr(&format!("{k}={v}")))
            .collect::<Result<_, _>>()?,
        cwd: job.cwd.as_deref().map(cstr).transpose()?,
        name,
        interactive,
    })
}

fn find_in_path(name: &str) -> bool {
    GUEST_PATH
        .split(':')
        .any(|d| std::path::Path::new(d).join(name).exists())
}

/// Runs in the forked child: sets up stdio and execs; never returns.
fn child(exec: &Exec, out_fd: i32, err_fd: i32, null_fd: i32, tty_fd: i32) -> ! {
    // SAFETY: plain syscalls on fds owned by this process; the child is single-threaded.
    unsafe {
        // I/O port permissions survive fork and execve: the job must not reach the ports.
        if PORT_MODE.load(Ordering::Relaxed) == 1 {
            libc::ioperm(u64::from(EXIT_PORT), u64::from(PORT_SPAN), 0);
        }
        libc::setsid();
        if exec.interactive {
            libc::dup2(tty_fd, 0);
            libc::dup2(tty_fd, 1);
            libc::dup2(tty_fd, 2);
            libc::ioctl(0, libc::TIOCSCTTY, 1);
        } else {
            libc::dup2(null_fd, 0);
            libc::dup2(out_fd, 1);
            libc::dup2(err_fd, 2);
        }
    }
    let fail = |code: i32, msg: &[u8]| -> ! {
        let mut line = Vec::with_capacity(64);
        line.extend_from_slice(b"bootbox: ");
        line.extend_from_slice(msg);
        line.push(b'\n');
        write_all(2, &line);
        // SAFETY: _exit never returns and is async-signal-safe.
        unsafe { libc::_exit(code) }
    };
    if let Some(cwd) = &exec.cwd {
        // SAFETY: cwd is a valid NUL-terminated string.
        if unsafe { libc::chdir(cwd.as_ptr()) } != 0 {
            let mut m = cwd.as_bytes().to_vec();
            m.extend_from_slice(b": cannot change directory: ");
            m.extend_from_slice(errno_str().as_bytes());
            fail(i32::from(STATUS_INIT_FAILURE), &m);
        }
    }
    let mut argv: Vec<*const libc::c_char> = exec.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = exec.envp.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    let mut denied = None;
    for cand in &exec.candidates {
        // SAFETY: argv/envp are NULL-terminated arrays of valid C strings that outlive the call.
        unsafe { libc::execve(cand.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => continue,
            Some(libc::ENOEXEC) => {
                // A script without #!: run it with sh, as shells do.
                let mut sh_argv: Vec<*const libc::c_char> = vec![c"sh".as_ptr(), cand.as_ptr()];
                sh_argv.extend(argv.iter().skip(1));
                // SAFETY: as above; sh_argv ends with the NULL taken from argv.
                unsafe { libc::execve(c"/bin/sh".as_ptr(), sh_argv.as_ptr(), envp.as_ptr()) };
                denied = Some(e);
            }
            _ => {
                if denied.is_none() {
                    denied = Some(e);
                }
            }
        }
    }
    let mut m = exec.name.as_bytes().to_vec();
    match denied {
        Some(e) => {
            m.extend_from_slice(b": ");
            m.extend_from_slice(e.to_string().as_bytes());
            fail(i32::from(STATUS_NOT_EXECUTABLE), &m)
        }
        None => {
            m.extend_from_slice(if exec.name.contains('/') {
                b": No such file or directory".as_slice()
            } else {
                b": command not found".as_slice()
            });
            fail(i32::from(STATUS_NOT_FOUND), &m)
        }
    }
}

fn status_code(status: i32) -> u8 {
    if libc::WIFEXITED(status) {
        (libc::WEXITSTATUS(status) & 0xff) as u8
    } else if libc::WIFSIGNALED(status) {
        (i32::from(STATUS_SIGNAL_BASE) + libc::WTERMSIG(status)).clamp(0, 255) as u8
    } else {
        STATUS_INIT_FAILURE
    }
}

/// Waits for the job, reaping every other child on the way. After the job ends, remaining
/// processes are killed and reaped so nothing writes to shares after the final sync.
fn wait_job(pid: libc::pid_t, already_reaped: Option<u8>) -> u8 {
    let mut code = already_reaped;
    while code.is_none() {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a valid local.
        let r = unsafe { libc::waitpid(-1, &mut status, 0) };
        if r == pid {
            code = Some(status_code(status));
        } else if r < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                _ => code = Some(STATUS_INIT_FAILURE),
            }
        }
    }
    // SAFETY: kill(-1) signals every process except init itself; waitpid reaps them.
    unsafe {
        libc::kill(-1, libc::SIGKILL);
        let mut status = 0;
        loop {
            let r = libc::waitpid(-1, &mut status, 0);
            if r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
    }
    code.unwrap_or(STATUS_INIT_FAILURE)
}

/// A pipe with close-on-exec ends: `[read, write]`.
fn make_pipe() -> Result<[i32; 2], String> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two fds into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", errno_str()));
    }
    Ok(fds)
}

/// Copies the job's output pipes to their consoles until both reach end of file. If the job
/// exits while something it left behind still holds a pipe open, everything else is killed so
/// the pipes close. Returns the job's status when it was reaped here.
fn relay(pid: libc::pid_t, mut pairs: [(i32, i32); 2]) -> Option<u8> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut job_code = None;
    loop {
        let mut polls: Vec<libc::pollfd> = pairs
            .iter()
            .filter(|(from, _)| *from >= 0)
            .map(|(from, _)| libc::pollfd {
                fd: *from,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        if polls.is_empty() {
            return job_code;
        }
        // SAFETY: polls is a valid array of pollfd of the given length.
        let ready = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, 100) };
        if ready < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return job_code;
        }
        if ready == 0 && job_code.is_none() {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                job_code = Some(status_code(status));
                // SAFETY: kill(-1) signals every process except init itself.
                unsafe { libc::kill(-1, libc::SIGKILL) };
            }
            continue;
        }
        for p in polls.iter().filter(|p| p.revents != 0) {
            let Some(pair) = pairs.iter_mut().find(|(from, _)| *from == p.fd) else {
                continue;
            };
            // SAFETY: buf has buf.len() writable bytes; pair.0 is an open pipe read end.
            let n = unsafe { libc::read(pair.0, buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                write_all(pair.1, &buf[..n as usize]);
            } else if n == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)
            {
                // SAFETY: closing the read end we own.
                unsafe { libc::close(pair.0) };
                pair.0 = -1;
            }
        }
    }
}

fn run() -> Result<u8, String> {
    mount_basics()?;
    open_console();
    // The console is up now: retry /dev/port if ioperm was not available earlier.
    if PORT_MODE.load(Ordering::Relaxed) == 0 && !TEST_MODE.load(Ordering::Relaxed) {
        setup_ports();
        if PORT_MODE.load(Ordering::Relaxed) == 0 {
            say(
                "cannot reach I/O ports 0x600/0x610: the kernel lacks CONFIG_X86_IOPL_IOPERM \
                 (and /dev/port); phases and the exit status cannot be reported",
            );
        }
    }
    let job = if warm::waiting() {
        warm::receive_job()?
    } else {
        read_job()?
    };
    mount_shares(&job)?;
    disks::prepare(&job);
    phase(PHASE_SHARES_MOUNTED);

    let con = CONSOLE_FD.load(Ordering::Relaxed);
    let test = TEST_MODE.load(Ordering::Relaxed);
    let out_fd = (!test)
        .then(|| open_raw_output(c"/dev/hvc0"))
        .flatten()
        .unwrap_or(con);
    let err_fd = (!test)
        .then(|| open_raw_output(c"/dev/hvc1"))
        .flatten()
        .unwrap_or(out_fd);
    if err_fd != con {
        ERR_FD.store(err_fd, Ordering::Relaxed);
    }
    let null_fd = open_path(c"/dev/null", libc::O_RDWR | libc::O_CLOEXEC);
    if null_fd < 0 {
        return Err(format!("cannot open /dev/null: {}", errno_str()));
    }
    let tty_fd = if job.argv.is_empty() && !TEST_MODE.load(Ordering::Relaxed) {
        open_path(
            c"/dev/ttyS0",
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    } else {
        -1
    };
    let tty_fd = if tty_fd >= 0 { tty_fd } else { con };
    let exec = prepare_exec(&job)?;

    // The job writes into pipes and the init relays them to the consoles: a job's stdout is
    // then a pipe, as on a host whose output is redirected (tools such as ls would otherwise
    // switch to terminal formatting on the hvc tty).
    let relay_to = [out_fd, err_fd];
    let pipes = if !exec.interactive && !test && out_fd != con {
        Some([make_pipe()?, make_pipe()?])
    } else {
        None
    };
    let (child_out, child_err) = match &pipes {
        Some([o, e]) => (o[1], e[1]),
        None => (out_fd, err_fd),
    };

    // SAFETY: the init is single-threaded; the child only uses prepared data and syscalls.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", errno_str()));
    }
    if pid == 0 {
        child(&exec, child_out, child_err, null_fd, tty_fd);
    }
    phase(PHASE_JOB_STARTED);
    let reaped = pipes.map(|[o, e]| {
        // SAFETY: the write ends belong to the child now; closing ours lets EOF arrive.
        unsafe {
            libc::close(o[1]);
            libc::close(e[1]);
        }
        relay(pid, [(o[0], relay_to[0]), (e[0], relay_to[1])])
    });
    let code = wait_job(pid, reaped.flatten());
    // Push any output still queued in the tty layers to the devices before reporting.
    for fd in [out_fd, err_fd] {
        if fd >= 0 {
            // SAFETY: tcdrain on an fd we own; errors (not a tty) are harmless.
            unsafe { libc::tcdrain(fd) };
        }
    }
    Ok(code)
}

fn finish(code: u8) -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if TEST_MODE.load(Ordering::Relaxed) {
        say(&format!("exit status {code}"));
        std::process::exit(i32::from(code));
    }
    port_out(EXIT_PORT, code);
    // Only reached if the VMM did not stop the VM on the exit port.
    // SAFETY: reboot ends the VM; PID 1 has CAP_SYS_BOOT.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    loop {
        // SAFETY: pause just sleeps until a signal.
        unsafe { libc::pause() };
    }
}

fn main() {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != 1 {
        eprintln!(
            "bootbox-init: this is the init of the bootbox appliance and must run as PID 1 inside the VM; \
             it is not meant to be started on the host"
        );
        std::process::exit(2);
    }
    // A bug in the init must still end the VM with a status rather than a kernel panic.
    std::panic::set_hook(Box::new(|info| {
        say(&format!("internal error: {info}"));
        // SAFETY: getpid has no preconditions; _exit ends a forked child without unwinding.
        unsafe {
            if libc::getpid() != 1 {
                libc::_exit(i32::from(STATUS_INIT_FAILURE));
            }
        }
        finish(STATUS_INIT_FAILURE);
    }));
    if std::path::Path::new(TEST_MODE_FLAG).exists() {
        TEST_MODE.store(true, Ordering::Relaxed);
        open_console();
    } else {
        setup_ports();
    }
    phase(PHASE_INIT_STARTED);
    let code = match run() {
        Ok(code) => {
            phase(PHASE_JOB_FINISHED);
            code
        }
        Err(msg) => {
            if ERR_FD.load(Ordering::Relaxed) < 0 && !TEST_MODE.load(Ordering::Relaxed) {
                if let Some(fd) = open_raw_output(c"/dev/hvc1") {
                    ERR_FD.store(fd, Ordering::Relaxed);
                }
            }
            say(&msg);
            STATUS_INIT_FAILURE
        }
    };
    finish(code);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_mapping() {
        assert_eq!(status_code(0), 0);
        assert_eq!(status_code(3 << 8), 3);
        assert_eq!(status_code(libc::SIGKILL), 128 + 9);
    }

    #[test]
    fn exec_plan_for_a_plain_command() {
        let job = Job {
            argv: vec!["find".into(), "/share".into()],
            env: vec![("PATH".into(), "/x:/y".into()), ("A".into(), "b".into())],
            cwd: Some("/share".into()),
            ..Job::default()
        };
        let e = prepare_exec(&job).unwrap();
        assert_eq!(
            e.candidates,
            vec![cstr("/x/find").unwrap(), cstr("/y/find").unwrap()]
        );
        assert!(e.envp.contains(&cstr("HOME=/root").unwrap()));
        assert!(e.envp.contains(&cstr("A=b").unwrap()));
        assert!(!e
            .envp
            .iter()
            .any(|v| v.as_bytes().starts_with(b"PATH=/usr")));
        assert!(!e.interactive);
    }

    #[test]
    fn exec_plan_for_interactive_shell_sets_term() {
        let e = prepare_exec(&Job::default()).unwrap();
        assert!(e.interactive);
        assert!(e.envp.contains(&cstr("TERM=linux").unwrap()));
        assert!(e.name == "bash" || e.name == "sh");
    }
}
