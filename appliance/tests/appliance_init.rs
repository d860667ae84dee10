//! Guest init tests on the host: the init is a static executable, and the real init runs as
//! PID 1 of a fresh PID + mount namespace chrooted into the extracted appliance (base archive
//! plus job archive), in its test mode (`/bootbox/test-mode`: no port I/O, phases and exit
//! status printed on stderr). This checks the ELF closure (tools really run in the chroot),
//! the job format, environment, cwd, exit status mapping and init failure handling.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use appliance::elf::{inspect, FileKind};
use appliance::{prepare, ApplianceSpec, Job, ShareMount};

mod common;
use common::scratch;

/// The init binary: `$BOOTBOX_INIT`, or built from this workspace into the test temp dir.
fn init_binary() -> PathBuf {
    static INIT: OnceLock<PathBuf> = OnceLock::new();
    INIT.get_or_init(|| {
        if let Some(p) = std::env::var_os("BOOTBOX_INIT") {
            return PathBuf::from(p);
        }
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("init-build");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "-q", "-p", "bootbox-init", "--manifest-path"])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(&target)
            .status()
            .expect("cargo runs");
        assert!(st.success(), "building bootbox-init failed");
        target.join("debug/bootbox-init")
    })
    .clone()
}

#[test]
fn init_is_statically_linked() {
    let init = init_binary();
    match inspect(&init).unwrap() {
        FileKind::Elf(info) => {
            assert!(info.is_static, "init has a dynamic section");
            assert_eq!(info.interp, None, "init has PT_INTERP");
            assert!(info.needed.is_empty());
        }
        other => panic!("init is not ELF: {other:?}"),
    }
    if let Ok(out) = Command::new("file").arg("-L").arg(&init).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("statically linked"), "file says: {text}");
    }
    // Started on the host (not PID 1) it refuses to do anything.
    let out = Command::new(&init).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must run as PID 1"));
}

fn can_use_namespaces() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("unshare")
        .args(["--pid", "--fork", "--mount", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

struct Booted {
    code: Option<i32>,
    stderr: String,
    stdout: String,
}

/// Extracts base + job archives into a fresh root and runs /init as PID 1 there.
fn boot(job: &Job) -> Booted {
    boot_with(job, |_| {})
}

/// Like [`boot`], with a hook to alter the extracted root before starting.
fn boot_with(job: &Job, alter: impl FnOnce(&Path)) -> Booted {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("init-e2e-cache");
        let p = prepare(&ApplianceSpec {
            init: init_binary(),
            extra_programs: vec![],
            disk_tools: false,
            cache_dir: cache,
        })
        .unwrap();
        p.path
    });
    let d = scratch("boot");
    let root = d.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let job_cpio = d.path().join("job.cpio");
    std::fs::write(&job_cpio, appliance::job_cpio(job).unwrap()).unwrap();
    for archive in [base.as_path(), job_cpio.as_path()] {
        let out = Command::new("cpio")
            .args(["-idm", "--quiet", "--no-absolute-filenames", "-F"])
            .arg(archive)
            .current_dir(&root)
            .output()
            .unwrap();
        assert!(out.status.success(), "cpio -i: {out:?}");
    }
    std::fs::write(root.join("bootbox/test-mode"), b"").unwrap();
    alter(&root);
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--propagation",
            "private",
            "chroot",
        ])
        .arg(&root)
        .arg("/init")
        .output()
        .unwrap();
    Booted {
        code: status.code(),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    }
}

fn job(argv: &[&str]) -> Job {
    Job {
        argv: argv.iter().map(|s| s.as_bytes().to_vec()).collect(),
        ..Job::default()
    }
}

#[test]
fn init_runs_jobs_as_pid1() {
    if !can_use_namespaces() {
        eprintln!("SKIP: needs root and unshare(1) for PID/mount namespaces");
        return;
    }
    // Output, stderr, exit status, env, cwd; tools from the closure really run.
    let mut j = job(&[
        "sh",
        "-c",
        "echo \"out:$GREETING:$(pwd):$$\"; ls /usr/bin/ls >/dev/null && echo ls-ok; echo oops >&2; exit 7",
    ]);
    j.env = vec![("GREETING".into(), "héllo\nworld".into())];
    j.cwd = Some("/tmp".into());
    let b = boot(&j);
    assert_eq!(b.code, Some(7), "{}", b.stderr);
    assert!(
        b.stderr.contains("out:héllo\nworld:/tmp:2\n"),
        "{}",
        b.stderr
    );
    assert!(b.stderr.contains("ls-ok\n"), "{}", b.stderr);
    assert!(b.stderr.contains("oops\n"), "{}", b.stderr);
    let phases: Vec<&str> = b
        .stderr
        .lines()
        .filter(|l| l.starts_with("bootbox-init: phase"))
        .collect();
    assert_eq!(
        phases,
        [
            "bootbox-init: phase 1",
            "bootbox-init: phase 2",
            "bootbox-init: phase 3",
            "bootbox-init: phase 4"
        ]
    );
    assert!(b.stderr.contains("bootbox-init: exit status 7"));
    assert!(b.stdout.is_empty());

    // Clean environment: only what the job and the init set.
    let b = boot(&job(&["env"]));
    assert_eq!(b.code, Some(0), "{}", b.stderr);
    let mut vars: Vec<&str> = b
        .stderr
        .lines()
        .filter(|l| !l.starts_with("bootbox-init:"))
        .collect();
    vars.sort();
    assert_eq!(
        vars,
        [
            "HOME=/root",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        ]
    );
}

#[test]
fn init_maps_failures_to_shell_like_statuses() {
    if !can_use_namespaces() {
        eprintln!("SKIP: needs root and unshare(1) for PID/mount namespaces");
        return;
    }
    let b = boot(&job(&["no-such-command-here"]));
    assert_eq!(b.code, Some(127), "{}", b.stderr);
    assert!(b
        .stderr
        .contains("bootbox: no-such-command-here: command not found"));

    let b = boot(&job(&["/etc/passwd"]));
    assert_eq!(b.code, Some(126), "{}", b.stderr);
    assert!(b.stderr.contains("Permission denied"), "{}", b.stderr);

    let b = boot(&job(&["sh", "-c", "kill -9 $$"]));
    assert_eq!(b.code, Some(128 + 9), "{}", b.stderr);

    // Orphans left running are killed and reaped; the job's status still wins.
    let b = boot(&job(&["sh", "-c", "sleep 1000 & exit 3"]));
    assert_eq!(b.code, Some(3), "{}", b.stderr);

    // A share that cannot be mounted is an init failure (125) with a message.
    let mut j = job(&["true"]);
    j.shares = vec![ShareMount {
        tag: "nosuchtag".into(),
        mount_point: "/share".into(),
        read_only: true,
    }];
    let b = boot(&j);
    assert_eq!(b.code, Some(125), "{}", b.stderr);
    assert!(
        b.stderr.contains("mount 9p \"nosuchtag\" on /share"),
        "{}",
        b.stderr
    );
    assert!(!b.stderr.contains("phase 2"));
}

#[test]
fn init_reports_a_bad_job_file() {
    if !can_use_namespaces() {
        eprintln!("SKIP: needs root and unshare(1) for PID/mount namespaces");
        return;
    }
    let b = boot_with(&job(&["true"]), |root| {
        std::fs::write(root.join("bootbox/job"), b"BBJOB\0\x01\x00\xff\xff").unwrap();
    });
    assert_eq!(b.code, Some(125), "{}", b.stderr);
    assert!(b.stderr.contains("bad /bootbox/job"), "{}", b.stderr);
    let b = boot_with(&job(&["true"]), |root| {
        std::fs::remove_file(root.join("bootbox/job")).unwrap();
    });
    assert_eq!(b.code, Some(125), "{}", b.stderr);
    assert!(
        b.stderr.contains("cannot read /bootbox/job"),
        "{}",
        b.stderr
    );
    // A missing working directory fails the job, not the init, with a message.
    let mut j = job(&["true"]);
    j.cwd = Some("/no/such/dir".into());
    let b = boot(&j);
    assert_eq!(b.code, Some(125), "{}", b.stderr);
    assert!(
        b.stderr.contains("/no/such/dir: cannot change directory"),
        "{}",
        b.stderr
    );
}

#[test]
fn default_tools_work_inside_the_appliance() {
    if !can_use_namespaces() {
        eprintln!("SKIP: needs root and unshare(1) for PID/mount namespaces");
        return;
    }
    let mut script = String::from("set -e; echo abc > /tmp/t; ");
    // user names resolve through the appliance's /etc/passwd
    script.push_str("echo \"owner=$(stat -c %U /init)\"; ");
    script.push_str("sha256sum /tmp/t; ");
    script.push_str("find /proc/1 -maxdepth 0 -type d; ");
    if appliance::elf::find_program("file").is_ok() {
        // `file` finds its magic database
        script.push_str("file -b /init; ");
    }
    let b = boot(&job(&["sh", "-c", &script]));
    assert_eq!(b.code, Some(0), "{}", b.stderr);
    assert!(b.stderr.contains("owner=root\n"), "{}", b.stderr);
    assert!(
        b.stderr
            .contains("edeaaff3f1774ad2888673770c6d64097e391bc362d7d6fb34982ddf0efd18cb  /tmp/t"),
        "{}",
        b.stderr
    );
    assert!(b.stderr.contains("/proc/1\n"), "{}", b.stderr);
    if appliance::elf::find_program("file").is_ok() {
        assert!(b.stderr.contains("statically linked"), "{}", b.stderr);
    }
}
