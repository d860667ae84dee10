//! The sandbox is for good once installed, so each test installs it in a child process: the
//! test binary runs itself again with [`CHILD_ROLE`] naming what the child does, and the parent
//! judges the child's exit status and output.

use super::*;
use std::fs;
use std::io;
use std::path::Path;
use std::process::{Command, Output};

/// Set in the child: which child body to run.
const CHILD_ROLE: &str = "VMM_SANDBOX_TEST_CHILD";
/// Set in the child of the Landlock test: the scratch directory.
const CHILD_ROOT: &str = "VMM_SANDBOX_TEST_ROOT";
/// Printed by a child whose kernel lacks the mechanism under test.
const UNSUPPORTED: &str = "sandbox mechanism unsupported here";

fn child_role() -> Option<String> {
    std::env::var(CHILD_ROLE).ok()
}

/// Runs the test `test` (its path inside the crate) again in a child process.
fn run_child(test: &str, role: &str, root: Option<&Path>) -> Output {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE, role);
    if let Some(root) = root {
        cmd.env(CHILD_ROOT, root);
    }
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Whether the child said its kernel lacks the mechanism (then the test has nothing to judge).
fn unsupported(out: &Output) -> bool {
    let skipped = text(&out.stdout).contains(UNSUPPORTED);
    if skipped {
        eprintln!("skipping: {}", text(&out.stdout).trim());
    }
    skipped
}

/// Child: a thread named `vcpu0` enters the vCPU role and makes `call`, which the vCPU filter
/// forbids.
fn forbidden_call_child(call: &str) -> ! {
    let report = install(&Policy::new()).unwrap();
    if !report.seccomp {
        println!("{UNSUPPORTED}: no seccomp filters");
        std::process::exit(0);
    }
    let call = call.to_string();
    let vcpu = std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || {
            enter_thread(ThreadRole::Vcpu);
            println!("vcpu0 is confined");
            match call.as_str() {
                // SAFETY: socket takes integers; the result is ignored (the process stops).
                "socket" => unsafe {
                    libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                },
                // SAFETY: TCGETS writes a termios into the zeroed buffer we pass.
                "ioctl" => unsafe {
                    let mut t: libc::termios = std::mem::zeroed();
                    libc::ioctl(libc::STDIN_FILENO, libc::TCGETS, &mut t);
                },
                // Refused quietly (glibc's malloc probes a /proc file from any thread).
                "open" => {
                    let err = fs::read("/proc/self/status").unwrap_err();
                    println!("open refused: {:?}", err.raw_os_error());
                    std::process::exit(0);
                }
                // A genuine crash must stay a crash, not become a "forbidden call" report.
                "segfault" => unsafe {
                    // SAFETY: none: this deliberately faults to show how a crash ends.
                    std::ptr::null_mut::<u8>().write_volatile(1);
                },
                other => panic!("unknown call {other}"),
            }
        })
        .unwrap();
    let _ = vcpu.join();
    println!("the forbidden call returned");
    std::process::exit(0)
}

fn judge_forbidden_call(test: &str, call: &str, report: &str) {
    let out = run_child(test, call, None);
    if unsupported(&out) {
        return;
    }
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.contains("vcpu0 is confined"), "{stdout}\n{stderr}");
    assert!(!stdout.contains("returned"), "{stdout}\n{stderr}");
    assert_eq!(out.status.code(), Some(125), "{stdout}\n{stderr}");
    assert!(stderr.contains(report), "expected {report:?} in:\n{stderr}");
}

#[test]
fn a_forbidden_system_call_stops_the_process_naming_thread_and_call() {
    if let Some(role) = child_role() {
        forbidden_call_child(&role);
    }
    judge_forbidden_call(
        "sandbox::tests::a_forbidden_system_call_stops_the_process_naming_thread_and_call",
        "socket",
        "bootbox: seccomp: thread 'vcpu0' made forbidden system call 41 (socket); stopping",
    );
}

#[test]
fn an_ioctl_outside_the_vcpu_requests_is_forbidden() {
    if let Some(role) = child_role() {
        forbidden_call_child(&role);
    }
    judge_forbidden_call(
        "sandbox::tests::an_ioctl_outside_the_vcpu_requests_is_forbidden",
        "ioctl",
        "bootbox: seccomp: thread 'vcpu0' made forbidden system call 16 (ioctl); stopping",
    );
}

#[test]
fn opening_a_file_from_a_vcpu_is_refused_without_stopping() {
    if let Some(role) = child_role() {
        forbidden_call_child(&role);
    }
    let out = run_child(
        "sandbox::tests::opening_a_file_from_a_vcpu_is_refused_without_stopping",
        "open",
        None,
    );
    if unsupported(&out) {
        return;
    }
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains(&format!("open refused: Some({})", libc::EACCES)),
        "{stdout}\n{stderr}"
    );
}

#[test]
fn a_crash_in_a_confined_thread_stays_a_crash() {
    use std::os::unix::process::ExitStatusExt;
    if let Some(role) = child_role() {
        forbidden_call_child(&role);
    }
    let out = run_child(
        "sandbox::tests::a_crash_in_a_confined_thread_stays_a_crash",
        "segfault",
        None,
    );
    if unsupported(&out) {
        return;
    }
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.contains("vcpu0 is confined"), "{stdout}\n{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSEGV),
        "{stdout}\n{stderr}"
    );
    assert!(!stderr.contains("forbidden"), "{stderr}");
}

/// A scratch tree: `outside/secret`, `ro/readme`, `rw/sub/file`, `rw/movable`; its root, and
/// the temporary directory that removes it on drop.
struct Scratch(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("vmm-sandbox-{tag}-"))
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        for dir in ["outside", "ro", "rw/sub"] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        fs::write(root.join("outside/secret"), "secret").unwrap();
        fs::write(root.join("ro/readme"), "readme").unwrap();
        fs::write(root.join("rw/sub/file"), "file").unwrap();
        fs::write(root.join("rw/movable"), "movable").unwrap();
        Scratch(root, dir)
    }
}

/// Child of the Landlock test: confine to `ro` (read-only) and `rw` (writable) under the
/// scratch root, then try what must work and what must not. Prints each failure; exits 1 if
/// any.
fn landlock_child() -> ! {
    let root = PathBuf::from(std::env::var_os(CHILD_ROOT).unwrap());
    let report = install(
        &Policy::new()
            .share(root.join("ro"), false)
            .share(root.join("rw"), true),
    )
    .unwrap();
    let abi = match report.landlock {
        LandlockOutcome::Enforced { abi, .. } => abi,
        LandlockOutcome::Unavailable(why) => {
            println!("{UNSUPPORTED}: {why}");
            std::process::exit(0);
        }
    };
    let mut failures: Vec<String> = Vec::new();
    let mut denied = |what: &str, r: io::Result<()>| match r {
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => {}
        other => failures.push(format!("{what}: expected EACCES, got {other:?}")),
    };
    let p = |rel: &str| root.join(rel);
    denied("read outside", fs::read(p("outside/secret")).map(drop));
    denied("list outside", fs::read_dir(p("outside")).map(drop));
    denied("read /etc/passwd", fs::read("/etc/passwd").map(drop));
    denied(
        "write into the read-only share",
        fs::OpenOptions::new()
            .write(true)
            .open(p("ro/readme"))
            .map(drop),
    );
    denied("create in the read-only share", fs::write(p("ro/new"), "x"));
    denied("create outside", fs::write(p("outside/new"), "x"));
    let mut works = |what: &str, r: io::Result<()>| {
        if let Err(e) = r {
            failures.push(format!("{what}: {e}"));
        }
    };
    works(
        "read the read-only share",
        fs::read_to_string(p("ro/readme")).map(|s| assert_eq!(s, "readme")),
    );
    works("list the read-only share", fs::read_dir(p("ro")).map(drop));
    works(
        "write in the writable share",
        fs::write(p("rw/created"), "written"),
    );
    works("mkdir in the writable share", fs::create_dir(p("rw/made")));
    if abi >= 2 {
        works(
            "rename across directories inside the writable share",
            fs::rename(p("rw/sub/file"), p("rw/made/file")),
        );
    }
    works(
        "read /proc/self/status (the report needs it)",
        fs::read("/proc/self/status").map(drop),
    );
    match fs::rename(p("rw/movable"), p("outside/moved")) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EXDEV) | Some(libc::EACCES)) => {}
        other => failures.push(format!(
            "rename out of the writable share: expected EXDEV or EACCES, got {other:?}"
        )),
    }
    if failures.is_empty() {
        println!("landlock checks passed");
        std::process::exit(0);
    }
    for f in &failures {
        println!("FAILED: {f}");
    }
    std::process::exit(1)
}

#[test]
fn landlock_confines_files_to_the_kernel_shares_and_devices_given() {
    if child_role().as_deref() == Some("landlock") {
        landlock_child();
    }
    let scratch = Scratch::new("landlock");
    let out = run_child(
        "sandbox::tests::landlock_confines_files_to_the_kernel_shares_and_devices_given",
        "landlock",
        Some(&scratch.0),
    );
    if unsupported(&out) {
        return;
    }
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("landlock checks passed"),
        "{stdout}\n{stderr}"
    );
    // What the child could and could not do, seen from outside the sandbox.
    let root = &scratch.0;
    assert_eq!(
        fs::read_to_string(root.join("rw/created")).unwrap(),
        "written"
    );
    assert!(root.join("rw/movable").exists());
    assert!(!root.join("outside/moved").exists());
    assert!(!root.join("outside/new").exists());
    assert!(!root.join("ro/new").exists());
}

/// Child of the file-server test: a 9p worker confined by its filter and Landlock serves a
/// session that uses every kind of request on the writable share. A call missing from the
/// worker's allowlist stops the child with the SIGSYS report.
fn file_server_child() -> ! {
    use p9::wire::{msg, setattr, Rmessage, SetAttr, Tmessage, WalkNames, NOFID, NOTAG};
    let root = PathBuf::from(std::env::var_os(CHILD_ROOT).unwrap());
    let share = root.join("rw");
    let report = install(&Policy::new().share(&share, true)).unwrap();
    if !report.seccomp {
        println!("{UNSUPPORTED}: no seccomp filters");
        std::process::exit(0);
    }
    let server = p9::Server::new(&share, p9::Config::default()).unwrap();
    let worker = std::thread::Builder::new()
        .name("9p-worker-0".into())
        .spawn(move || {
            enter_thread(ThreadRole::P9Worker);
            let walk = |fid, newfid, names: &[&'static [u8]]| Tmessage::Walk {
                fid,
                newfid,
                names: WalkNames::new(names).unwrap(),
            };
            let times = SetAttr {
                valid: setattr::MODE | setattr::SIZE | setattr::ATIME | setattr::MTIME,
                mode: 0o600,
                size: 2,
                ..SetAttr::default()
            };
            let fifo = libc::S_IFIFO | 0o644;
            let session: Vec<(Tmessage<'_>, u8)> = vec![
                (
                    Tmessage::Version {
                        msize: 65536,
                        version: b"9P2000.L",
                    },
                    msg::RVERSION,
                ),
                (
                    Tmessage::Attach {
                        fid: 1,
                        afid: NOFID,
                        uname: b"",
                        aname: b"",
                        n_uname: 0,
                    },
                    msg::RATTACH,
                ),
                (
                    Tmessage::Getattr {
                        fid: 1,
                        mask: 0x3fff,
                    },
                    msg::RGETATTR,
                ),
                (Tmessage::Statfs { fid: 1 }, msg::RSTATFS),
                (walk(1, 2, &[]), msg::RWALK),
                (Tmessage::Lopen { fid: 2, flags: 0 }, msg::RLOPEN),
                (
                    Tmessage::Readdir {
                        fid: 2,
                        offset: 0,
                        count: 4096,
                    },
                    msg::RREADDIR,
                ),
                (walk(1, 3, &[]), msg::RWALK),
                (
                    Tmessage::Lcreate {
                        fid: 3,
                        name: b"f",
                        flags: 0o102,
                        mode: 0o644,
                        gid: 0,
                    },
                    msg::RLCREATE,
                ),
                (
                    Tmessage::Write {
                        fid: 3,
                        offset: 0,
                        data: b"data",
                    },
                    msg::RWRITE,
                ),
                (
                    Tmessage::Read {
                        fid: 3,
                        offset: 0,
                        count: 64,
                    },
                    msg::RREAD,
                ),
                (
                    Tmessage::Fsync {
                        fid: 3,
                        datasync: 0,
                    },
                    msg::RFSYNC,
                ),
                (walk(1, 4, &[b"f"]), msg::RWALK),
                (
                    Tmessage::Setattr {
                        fid: 4,
                        attr: times,
                    },
                    msg::RSETATTR,
                ),
                (
                    Tmessage::Mkdir {
                        dfid: 1,
                        name: b"d",
                        mode: 0o755,
                        gid: 0,
                    },
                    msg::RMKDIR,
                ),
                (
                    Tmessage::Symlink {
                        fid: 1,
                        name: b"l",
                        target: b"f",
                        gid: 0,
                    },
                    msg::RSYMLINK,
                ),
                (walk(1, 5, &[b"l"]), msg::RWALK),
                (Tmessage::Readlink { fid: 5 }, msg::RREADLINK),
                (
                    Tmessage::Link {
                        dfid: 1,
                        fid: 4,
                        name: b"hard",
                    },
                    msg::RLINK,
                ),
                (walk(1, 6, &[b"d"]), msg::RWALK),
                (
                    Tmessage::Renameat {
                        olddirfid: 1,
                        oldname: b"hard",
                        newdirfid: 6,
                        newname: b"moved",
                    },
                    msg::RRENAMEAT,
                ),
                (
                    Tmessage::Rename {
                        fid: 4,
                        dfid: 6,
                        name: b"f2",
                    },
                    msg::RRENAME,
                ),
                (
                    Tmessage::Mknod {
                        dfid: 1,
                        name: b"fifo",
                        mode: fifo,
                        major: 0,
                        minor: 0,
                        gid: 0,
                    },
                    msg::RMKNOD,
                ),
                (
                    Tmessage::Unlinkat {
                        dirfid: 6,
                        name: b"moved",
                        flags: 0,
                    },
                    msg::RUNLINKAT,
                ),
                (walk(1, 7, &[b".."]), msg::RWALK),
                (Tmessage::Clunk { fid: 5 }, msg::RCLUNK),
            ];
            let mut failures = Vec::new();
            let mut request = Vec::new();
            let mut reply = p9::VecReply::new(65536);
            for (tag, (message, expected)) in session.iter().enumerate() {
                request.clear();
                let tag = if tag == 0 { NOTAG } else { tag as u16 };
                message.encode(tag, &mut request);
                let n = server.handle(&request, &mut reply);
                let answer = &reply.as_slice()[..n];
                if answer.get(4) != Some(expected) {
                    let decoded = Rmessage::decode(answer).map(|(_, r)| r);
                    failures.push(format!("{message:?}: {decoded:?}"));
                }
            }
            failures
        })
        .unwrap();
    let failures = worker.join().unwrap();
    if failures.is_empty() {
        println!("file server checks passed");
        std::process::exit(0);
    }
    for f in failures {
        println!("FAILED: {f}");
    }
    std::process::exit(1)
}

#[test]
fn the_file_server_works_under_its_filter_and_landlock() {
    if child_role().as_deref() == Some("file-server") {
        file_server_child();
    }
    let scratch = Scratch::new("file-server");
    let out = run_child(
        "sandbox::tests::the_file_server_works_under_its_filter_and_landlock",
        "file-server",
        Some(&scratch.0),
    );
    if unsupported(&out) {
        return;
    }
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("file server checks passed"),
        "{stdout}\n{stderr}"
    );
    let rw = scratch.0.join("rw");
    assert_eq!(fs::read_to_string(rw.join("d/f2")).unwrap(), "da");
    assert_eq!(fs::read_link(rw.join("l")).unwrap(), Path::new("f"));
    assert!(!rw.join("d/moved").exists() && rw.join("fifo").exists());
}

/// Child of the block-worker test: two disk images opened before the sandbox (one read-only,
/// one writable) and a policy that names neither, as `bootbox run --disk` does; a thread in
/// the block-worker role then reads both, writes and flushes the writable one, and can neither
/// write the read-only one nor open either path again.
fn block_worker_child() -> ! {
    let root = PathBuf::from(std::env::var_os(CHILD_ROOT).unwrap());
    let (ro_path, rw_path) = (root.join("outside/ro.img"), root.join("outside/rw.img"));
    let open = |path: &Path, writable: bool| {
        disk::open(
            path,
            disk::OpenOptions {
                format: None,
                writable,
            },
        )
        .unwrap()
    };
    let (ro, rw) = (open(&ro_path, false), open(&rw_path, true));
    let report = install(&Policy::new()).unwrap();
    if !report.seccomp || !matches!(report.landlock, LandlockOutcome::Enforced { .. }) {
        println!("{UNSUPPORTED}: {report:?}");
        std::process::exit(0);
    }
    let worker = std::thread::Builder::new()
        .name("block-worker-0".into())
        .spawn(move || {
            enter_thread(ThreadRole::BlockWorker);
            let mut failures: Vec<String> = Vec::new();
            let mut buf = [0u8; 512];
            if let Err(e) = ro.read_at(&mut buf, 512) {
                failures.push(format!("read the read-only image: {e}"));
            } else if buf != [1u8; 512] {
                failures.push("read the read-only image: wrong bytes".into());
            }
            if let Err(e) = rw.write_at(b"written by a block worker", 1024) {
                failures.push(format!("write the writable image: {e}"));
            }
            if let Err(e) = rw.flush() {
                failures.push(format!("flush the writable image: {e}"));
            }
            let direct = ro.direct_file().expect("a raw image has a direct file");
            use std::os::unix::fs::FileExt;
            match direct.write_at(b"x", 0) {
                Err(e) if e.raw_os_error() == Some(libc::EBADF) => {}
                other => failures.push(format!("write the read-only image: {other:?}")),
            }
            // Refused quietly: open is not in the role's list.
            match fs::OpenOptions::new().write(true).open(&ro_path) {
                Err(e) if e.raw_os_error() == Some(libc::EACCES) => {}
                other => failures.push(format!("reopen the read-only image: {other:?}")),
            }
            failures
        })
        .unwrap();
    let failures = worker.join().unwrap();
    if failures.is_empty() {
        println!("block worker checks passed");
        std::process::exit(0);
    }
    for f in failures {
        println!("FAILED: {f}");
    }
    std::process::exit(1)
}

#[test]
fn a_block_worker_serves_images_opened_before_the_sandbox_and_nothing_else() {
    if child_role().as_deref() == Some("block-worker") {
        block_worker_child();
    }
    let scratch = Scratch::new("block-worker");
    fs::write(scratch.0.join("outside/ro.img"), vec![1u8; 4096]).unwrap();
    fs::write(scratch.0.join("outside/rw.img"), vec![0u8; 4096]).unwrap();
    let out = run_child(
        "sandbox::tests::a_block_worker_serves_images_opened_before_the_sandbox_and_nothing_else",
        "block-worker",
        Some(&scratch.0),
    );
    if unsupported(&out) {
        return;
    }
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("block worker checks passed"),
        "{stdout}\n{stderr}"
    );
    let rw = fs::read(scratch.0.join("outside/rw.img")).unwrap();
    assert_eq!(&rw[1024..1024 + 25], b"written by a block worker");
    assert_eq!(
        fs::read(scratch.0.join("outside/ro.img")).unwrap(),
        vec![1u8; 4096]
    );
}

#[test]
fn installing_twice_is_refused_and_threads_are_told_their_role() {
    if child_role().as_deref() == Some("twice") {
        let first = install(&Policy::new()).unwrap();
        assert!(is_installed());
        let second = install(&Policy::new());
        assert!(matches!(second, Err(SandboxError::AlreadyInstalled)));
        // Entering a role is harmless for a thread that only does what the role allows.
        let t = std::thread::Builder::new()
            .name("event-loop".into())
            .spawn(|| {
                enter_thread(ThreadRole::EventLoop);
                std::thread::sleep(std::time::Duration::from_millis(1));
                println!("confined thread ran");
            })
            .unwrap();
        t.join().unwrap();
        println!("seccomp {}", first.seccomp);
        std::process::exit(0);
    }
    let out = run_child(
        "sandbox::tests::installing_twice_is_refused_and_threads_are_told_their_role",
        "twice",
        None,
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("confined thread ran"), "{stdout}\n{stderr}");
}

#[test]
fn without_install_entering_a_role_does_nothing() {
    // This process never installs the sandbox (only children do), so a role that forbids
    // everything but the basics must not stop a thread that opens files.
    std::thread::spawn(|| {
        enter_thread(ThreadRole::Device);
        fs::read("/proc/self/status").unwrap();
    })
    .join()
    .unwrap();
    assert!(!is_installed());
}

#[test]
fn the_shortfall_line_names_what_is_missing() {
    let full = Report {
        no_new_privs: true,
        landlock: LandlockOutcome::Enforced {
            abi: 2,
            complete: false,
        },
        seccomp: true,
        seccomp_requested: true,
    };
    assert_eq!(full.shortfall(), None);
    // Filters left off on purpose are not a shortfall.
    let chosen = Report {
        seccomp: false,
        seccomp_requested: false,
        ..full.clone()
    };
    assert_eq!(chosen.shortfall(), None);
    let bare = Report {
        no_new_privs: true,
        landlock: LandlockOutcome::Unavailable(LandlockSupport::NotEnabled),
        seccomp: false,
        seccomp_requested: true,
    };
    let line = bare.shortfall().unwrap();
    assert!(
        line.contains("no Landlock") && line.contains("lsm="),
        "{line}"
    );
    assert!(line.contains("seccomp") && !line.contains('\n'), "{line}");
}

#[test]
fn host_support_is_reported() {
    let s = host_support();
    // This suite runs on Linux with seccomp and no_new_privs (both since 3.5).
    assert!(s.no_new_privs && s.seccomp_filters, "{s:?}");
    if let LandlockSupport::Abi(v) = s.landlock {
        assert!(v >= 1, "{s:?}");
    }
}
