//! End-to-end tests: the real guest kernel booted by the real bootbox VMM, compared with what
//! the host itself sees. They need a KVM that can boot Linux, so they are `#[ignore]`d in a
//! plain `cargo test`; `scripts/test.sh` runs them with `--ignored`, directly on a host with
//! hardware virtualisation or inside the nested test host otherwise, with BOOTBOX_KERNEL
//! (and BOOTBOX_BIN / BOOTBOX_INIT / BOOTBOX_CACHE) set.
//!
//! The tests at the bottom that fail before any VM starts (bad arguments) need no KVM and
//! run everywhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "e2e/disks.rs"]
mod disks;

fn bootbox_bin() -> PathBuf {
    std::env::var_os("BOOTBOX_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_bootbox")))
}

fn kernel() -> PathBuf {
    let k = std::env::var_os("BOOTBOX_KERNEL")
        .map(PathBuf::from)
        .expect("BOOTBOX_KERNEL must name the guest kernel (scripts/test.sh sets it)");
    assert!(k.is_file(), "BOOTBOX_KERNEL={} does not exist", k.display());
    k
}

fn bootbox(args: &[&str]) -> Output {
    let out = Command::new(bootbox_bin())
        .args(args)
        .env("BOOTBOX_KERNEL", kernel())
        .output()
        .expect("cannot start bootbox");
    eprintln!(
        "bootbox {:?} -> {:?}\n--- stderr ---\n{}",
        args,
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A scratch directory removed when dropped. Mode 0755 like an ordinary directory (not
/// tempfile's 0700): an unprivileged user and the guest's view of it must be able to enter.
struct Scratch(tempfile::TempDir);

impl Scratch {
    fn new(name: &str) -> Scratch {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::Builder::new()
            .prefix(&format!("bootbox-e2e-{name}-"))
            .tempdir()
            .unwrap();
        std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(t)
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn s(&self) -> &str {
        self.path().to_str().unwrap()
    }
}

/// A deterministic tree of `files` files in nested directories, with varied sizes, empty
/// files, names with spaces, symlinks (relative, absolute, dangling) and an empty directory.
fn generate_tree(root: &Path, files: usize) {
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for i in 0..files {
        let dir = root
            .join(format!("d{}", i % 37))
            .join(format!("sub {}", i % 5));
        std::fs::create_dir_all(&dir).unwrap();
        let size = match i % 10 {
            0 => 0,
            1 => (next() % 300_000) as usize,
            _ => (next() % 5000) as usize,
        };
        let data: Vec<u8> = (0..size).map(|_| next() as u8).collect();
        std::fs::write(dir.join(format!("file-{i}.bin")), data).unwrap();
    }
    std::fs::create_dir_all(root.join("empty dir")).unwrap();
    std::os::unix::fs::symlink("d0/sub 0/file-0.bin", root.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("does-not-exist", root.join("dangling")).unwrap();
}

/// Runs a shell command on the host in `dir`.
fn host_sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "host: {script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs the same shell script in the appliance (cwd /share) and on the host (cwd = tree).
fn same_in_guest_and_host(tree: &Scratch, script: &str) {
    let guest = bootbox(&[
        "run",
        "--share",
        tree.s(),
        "--timeout",
        "600",
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_eq!(
        guest.status.code(),
        Some(0),
        "guest run of {script:?} failed"
    );
    let host = host_sh(tree.path(), script);
    assert!(!host.is_empty(), "host output of {script:?} is empty");
    let g = stdout(&guest);
    if g != host {
        let diff: Vec<_> = g
            .lines()
            .zip(host.lines())
            .filter(|(a, b)| a != b)
            .take(5)
            .collect();
        panic!(
            "{script:?}: guest ({} lines) and host ({} lines) differ; first differences: {diff:#?}",
            g.lines().count(),
            host.lines().count()
        );
    }
}

// ---- the boot itself (bootbox boot) ----

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn bare_boot_reaches_init_and_returns_the_chosen_status() {
    let scratch = Scratch::new("boot");
    let spec = appliance::ApplianceSpec {
        init: appliance::find_init().expect("guest init"),
        extra_programs: vec![],
        disk_tools: false,
        cache_dir: appliance::default_cache_dir().unwrap(),
    };
    let base = appliance::prepare(&spec).expect("appliance");
    let job = appliance::Job {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "echo job-ran-in-guest; exit 42".into(),
        ],
        ..Default::default()
    };
    let job_cpio = scratch.path().join("job.cpio");
    std::fs::write(&job_cpio, appliance::job_cpio(&job).unwrap()).unwrap();
    let out = bootbox(&[
        "boot",
        "--initrd",
        base.path.to_str().unwrap(),
        "--initrd",
        job_cpio.to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 reboot=k panic=-1",
        "--no-stdin",
        "--timeout",
        "600",
    ]);
    let console = stdout(&out);
    assert!(
        console.contains("Linux version 6."),
        "no kernel banner on the console:\n{console}"
    );
    assert!(
        console.contains("Run /init as init process"),
        "init did not start:\n{console}"
    );
    assert!(
        console.contains("job-ran-in-guest"),
        "the job's output is missing:\n{console}"
    );
    assert_eq!(out.status.code(), Some(42));
}

// ---- jobs (bootbox run) ----

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn exit_statuses_propagate() {
    for status in [0, 1, 42] {
        let out = bootbox(&[
            "run",
            "--timeout",
            "600",
            "--",
            "sh",
            "-c",
            &format!("exit {status}"),
        ]);
        assert_eq!(out.status.code(), Some(status), "status {status}");
    }
    // The same with the system call filters off (the rest of the sandbox stays).
    let out = bootbox(&[
        "run",
        "--no-seccomp",
        "--timeout",
        "600",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "without seccomp filters");
    // With --console the kernel's messages go to stderr; stdout stays the job's own.
    let out = bootbox(&[
        "run",
        "--console",
        "--timeout",
        "600",
        "--",
        "echo",
        "only this",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "only this\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Linux version"),
        "the console did not reach stderr"
    );
    // Arguments travel as bytes: a Latin-1 file name reaches the job unchanged.
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::OsStr::from_bytes(b"caf\xe9 \xff");
    let out = Command::new(bootbox_bin())
        .args([
            "run",
            "--timeout",
            "600",
            "--",
            "sh",
            "-c",
            "printf %s \"$1\"",
            "sh",
        ])
        .arg(name)
        .env("BOOTBOX_KERNEL", kernel())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(out.stdout, name.as_bytes());
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn missing_and_unexecutable_commands_give_127_and_126() {
    let out = bootbox(&["run", "--timeout", "600", "--", "no-such-command-xyz"]);
    assert_eq!(out.status.code(), Some(127));
    let out = bootbox(&["run", "--timeout", "600", "--", "/etc/passwd"]);
    assert_eq!(out.status.code(), Some(126));
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn find_stat_ls_and_sha256sum_match_the_host() {
    let tree = Scratch::new("tree");
    generate_tree(tree.path(), 3000);
    same_in_guest_and_host(&tree, "find . | LC_ALL=C sort");
    same_in_guest_and_host(
        &tree,
        "find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum",
    );
    same_in_guest_and_host(
        &tree,
        "find . -print0 | LC_ALL=C sort -z | xargs -0 stat -c '%n|%s|%a|%F|%h|%u|%g|%Y|%N'",
    );
    same_in_guest_and_host(&tree, "LC_ALL=C ls -lnR --time-style=+%s .");
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn stdout_and_stderr_stream_apart_and_byte_exact() {
    let tree = Scratch::new("bigout");
    let mk = |name: &str, len: usize, mul: u64| {
        let data: Vec<u8> = (0..len as u64)
            .map(|i| (i.wrapping_mul(mul) >> 3) as u8)
            .collect();
        std::fs::write(tree.path().join(name), &data).unwrap();
        data
    };
    let out_data = mk("out.bin", 24 << 20, 2654435761);
    let err_data = mk("err.bin", 3 << 20, 40503);
    let out = bootbox(&[
        "run",
        "--share",
        tree.s(),
        "--timeout",
        "900",
        "--",
        "sh",
        "-c",
        "cat out.bin; cat err.bin >&2",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stdout.len() == out_data.len() && out.stdout == out_data,
        "stdout differs ({} bytes)",
        out.stdout.len()
    );
    // stderr also carries nothing but the job's bytes.
    assert!(
        out.stderr == err_data,
        "stderr differs ({} bytes)",
        out.stderr.len()
    );
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn a_hung_job_hits_the_timeout() {
    let out = bootbox(&["run", "--timeout", "20", "--", "sleep", "1000"]);
    assert_eq!(out.status.code(), Some(124));
    assert!(String::from_utf8_lossy(&out.stderr).contains("did not finish"));
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn read_only_shares_refuse_writes_and_rw_shares_write_through() {
    let tree = Scratch::new("rw");
    std::fs::write(tree.path().join("keep"), b"original").unwrap();
    let ro = bootbox(&[
        "run", "--share", tree.s(), "--timeout", "600", "--", "sh", "-c",
        "echo x > new-file || echo create-refused; echo y >> keep || echo append-refused; rm keep || echo rm-refused; mkdir d || echo mkdir-refused",
    ]);
    assert_eq!(ro.status.code(), Some(0));
    let said = stdout(&ro);
    for refused in [
        "create-refused",
        "append-refused",
        "rm-refused",
        "mkdir-refused",
    ] {
        assert!(said.contains(refused), "{refused} missing in {said:?}");
    }
    assert!(!tree.path().join("new-file").exists());
    assert!(!tree.path().join("d").exists());
    assert_eq!(
        std::fs::read(tree.path().join("keep")).unwrap(),
        b"original"
    );

    let spec = format!("{}:rw", tree.s());
    let rw = bootbox(&[
        "run",
        "--share",
        &spec,
        "--timeout",
        "600",
        "--",
        "sh",
        "-c",
        "echo written-in-guest > new-file && mkdir sub && mv keep sub/moved",
    ]);
    assert_eq!(rw.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(tree.path().join("new-file")).unwrap(),
        "written-in-guest\n"
    );
    assert_eq!(
        std::fs::read(tree.path().join("sub/moved")).unwrap(),
        b"original"
    );

    // Passthrough ownership (root only; the e2e tests run as root): a guest's chown reaches
    // the host file, with the 9p workers under their seccomp allowlist, which grants chown
    // only in this mode. Set-id bits still never reach the host.
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        use std::os::unix::fs::MetadataExt;
        let pass = bootbox(&[
            "run",
            "--passthrough-ownership",
            "--share",
            &spec,
            "--timeout",
            "600",
            "--",
            "sh",
            "-c",
            "echo owned > owned && chown 1234:5678 owned && chmod 4755 owned; stat -c '%u:%g' owned",
        ]);
        assert_eq!(pass.status.code(), Some(0));
        assert_eq!(stdout(&pass).trim(), "1234:5678");
        let meta = std::fs::metadata(tree.path().join("owned")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (1234, 5678));
        assert_eq!(meta.mode() & 0o6000, 0, "no set-id bits on the host");
    }
}

/// What a job could still do through its working directory after the host moved that
/// directory out of the share mid-job: the guest signals it is in place, the host moves
/// `share/a` next to a secret outside the share, then the guest lists, reads, creates and
/// makes a directory through its cwd (share/a/b). Returns the guest's stdout.
fn job_after_the_host_moves_its_cwd_away(
    name: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> String {
    let t = Scratch::new(name);
    let share = t.path().join("share");
    std::fs::create_dir_all(share.join("a/b")).unwrap();
    std::fs::write(share.join("a/b/inner"), b"inner").unwrap();
    std::fs::create_dir_all(t.path().join("outside")).unwrap();
    std::fs::write(t.path().join("outside/secret"), b"SECRET").unwrap();
    let spec = format!("{}:rw", share.display());
    let script = "cd /share/a/b || exit 3; touch /share/ready; i=0; \
        until ls /share | grep -qx moved; do i=$((i+1)); [ $i -gt 20000 ] && exit 4; sleep 0.05; done; \
        ls . >/dev/null 2>&1 && echo LISTED; \
        cat inner 2>/dev/null && echo READ-INNER; \
        (echo x > planted) 2>/dev/null && echo PLANTED; \
        mkdir made 2>/dev/null && echo MADE-DIR; \
        echo finished";
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    all.extend_from_slice(&[
        "--share",
        &spec,
        "--timeout",
        "900",
        "--",
        "sh",
        "-c",
        script,
    ]);
    let mut cmd = Command::new(bootbox_bin());
    cmd.args(&all)
        .env("BOOTBOX_KERNEL", kernel())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("cannot start bootbox");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(900);
    while !share.join("ready").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the job never got ready"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::fs::rename(share.join("a"), t.path().join("a")).unwrap();
    std::fs::write(share.join("moved"), b"").unwrap();
    let out = child.wait_with_output().unwrap();
    eprintln!("--- stderr ---\n{}", String::from_utf8_lossy(&out.stderr));
    let said = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("finished"), "{said}");
    let planted = t.path().join("a/b/planted").exists() || t.path().join("a/b/made").exists();
    assert_eq!(
        planted,
        said.contains("PLANTED") || said.contains("MADE-DIR"),
        "the guest's report and the host's tree disagree: {said}"
    );
    said
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn a_directory_moved_out_mid_job_is_out_of_reach_and_the_sandbox_alone_holds_too() {
    // The attack is real: with the server's checks off and no sandbox, it gets through.
    let open = job_after_the_host_moves_its_cwd_away(
        "moved-open",
        &[("BOOTBOX_TEST_UNCHECKED_9P", "1")],
        &["--no-sandbox"],
    );
    assert!(
        open.contains("PLANTED") && open.contains("READ-INNER"),
        "{open}"
    );
    // The server's checks alone stop it ...
    let checked = job_after_the_host_moves_its_cwd_away("moved-checked", &[], &["--no-sandbox"]);
    // ... and so does the sandbox alone (Landlock follows the real tree at access time).
    let sandboxed = job_after_the_host_moves_its_cwd_away(
        "moved-sandboxed",
        &[("BOOTBOX_TEST_UNCHECKED_9P", "1")],
        &[],
    );
    for said in [&checked, &sandboxed] {
        for reached in ["LISTED", "READ-INNER", "PLANTED", "MADE-DIR"] {
            assert!(!said.contains(reached), "{reached}: {said}");
        }
    }
}

/// Whether `dir`'s filesystem takes user extended attributes (where bootbox keeps a guest's
/// view of ownership on rw shares).
fn user_xattrs_work(dir: &Path) -> bool {
    let probe = dir.join(".xattr-probe");
    std::fs::write(&probe, b"").unwrap();
    let path = std::ffi::CString::new(probe.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: both strings are NUL-terminated and the value is readable for its length.
    let r = unsafe {
        libc::setxattr(
            path.as_ptr(),
            c"user.probe".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    std::fs::remove_file(&probe).unwrap();
    r == 0
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn an_ordinary_user_runs_jobs_without_root() {
    use std::os::unix::process::CommandExt;
    // SAFETY: getuid cannot fail.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("skipped: needs root to make an ordinary user to run as");
        return;
    }
    const USER: u32 = 4242;
    let t = Scratch::new("ordinary-user");
    let home = t.path().join("home");
    let tree = t.path().join("tree");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("f"), b"user data\n").unwrap();
    // The kernel where any user can read it, as `build-kernel.sh --install` leaves it.
    let k = t.path().join("vmlinux");
    std::fs::copy(kernel(), &k).unwrap();
    for p in [t.path(), &home, &tree, &tree.join("f"), &k] {
        std::os::unix::fs::chown(p, Some(USER), Some(USER)).unwrap();
    }
    // The user is in the group that owns /dev/kvm, as in the usual `kvm` group setup.
    std::os::unix::fs::chown("/dev/kvm", None, Some(USER)).unwrap();
    std::fs::set_permissions(
        "/dev/kvm",
        std::os::unix::fs::PermissionsExt::from_mode(0o660),
    )
    .unwrap();
    let spec = format!("{}:rw", tree.display());
    let out = Command::new(bootbox_bin())
        .args([
            "run",
            "--share",
            &spec,
            "--timeout",
            "900",
            "--",
            "sh",
            "-c",
        ])
        .arg("cat f; echo made > new; mkdir d; touch tool; chmod 4755 tool; stat -c '%a' tool")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("BOOTBOX_KERNEL", &k)
        .env(
            "BOOTBOX_INIT",
            std::env::var_os("BOOTBOX_INIT").unwrap_or_default(),
        )
        .uid(USER)
        .gid(USER)
        .output()
        .unwrap();
    let said = stdout(&out);
    eprintln!("--- stderr ---\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.starts_with("user data\n"), "{said}");
    use std::os::unix::fs::MetadataExt;
    for made in ["new", "d", "tool"] {
        let m = std::fs::metadata(tree.join(made)).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (USER, USER),
            "{made} must belong to the user"
        );
    }
    let host_mode = std::fs::metadata(tree.join("tool")).unwrap().mode();
    assert_eq!(host_mode & 0o7000, 0, "no set-id bit on the host");
    // The guest reads back its set-uid bit where the host can keep the guest's view.
    let expect = if user_xattrs_work(&tree) {
        "4755"
    } else {
        "755"
    };
    assert_eq!(said.lines().last(), Some(expect), "{said}");
    // The appliance was built in the user's own cache.
    let cache = home.join(".cache/bootbox");
    assert!(cache.is_dir(), "no cache under the user's home");
    assert_eq!(std::fs::metadata(&cache).unwrap().uid(), USER);
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn several_shares_mount_under_their_tags() {
    let a = Scratch::new("multi-a");
    let b = Scratch::new("multi-b");
    std::fs::write(a.path().join("in-a"), b"A").unwrap();
    std::fs::write(b.path().join("in-b"), b"B").unwrap();
    let sa = format!("{}:alpha", a.s());
    let sb = format!("{}:beta", b.s());
    let out = bootbox(&[
        "run",
        "--share",
        &sa,
        "--share",
        &sb,
        "--timeout",
        "600",
        "--",
        "cat",
        "/share/alpha/in-a",
        "/share/beta/in-b",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "AB");
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn phases_are_recorded_and_the_second_run_reuses_the_appliance() {
    let scratch = Scratch::new("phases");
    let json = scratch.path().join("run.json");
    let j = json.to_str().unwrap();
    for _ in 0..2 {
        let out = bootbox(&[
            "run",
            "--cold",
            "--json",
            j,
            "--phases",
            "--timeout",
            "600",
            "--share",
            scratch.s(),
            "--",
            "true",
        ]);
        assert_eq!(out.status.code(), Some(0));
    }
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(
        record["appliance_built"],
        serde_json::Value::Bool(false),
        "the second run rebuilt the appliance"
    );
    let cold_order = [
        "process start",
        "kvm vm created",
        "memory ready",
        "kernel loaded",
        "initrd loaded",
        "first KVM_RUN",
        "init started",
        "shares mounted",
        "job started",
        "job finished",
        "vm exit",
    ];
    assert_phase_order(&record, &cold_order);
    // The same job resumed from the warm-start snapshot: no kernel is loaded, the guest's
    // first phase is receiving its job.
    let out = bootbox(&[
        "run",
        "--warm",
        "--json",
        j,
        "--phases",
        "--timeout",
        "600",
        "--share",
        scratch.s(),
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let warm_order = [
        "process start",
        "snapshot opened",
        "memory mapped",
        "kvm vm created",
        "memory ready",
        "state restored",
        "first KVM_RUN",
        "job received",
        "shares mounted",
        "job started",
        "job finished",
        "vm exit",
    ];
    assert_phase_order(&record, &warm_order);
    assert!(record["page_faults"].is_array() && record["guest_resident_kib"].is_u64());
}

/// Every phase in `order` is in the run record, in that order.
fn assert_phase_order(record: &serde_json::Value, order: &[&str]) {
    let phases: Vec<(String, u64)> = record["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["start_ns"].as_u64().unwrap(),
            )
        })
        .collect();
    let at = |name: &str| {
        phases
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("phase {name} missing: {phases:?}"))
    };
    for w in order.windows(2) {
        assert!(at(w[0]) <= at(w[1]), "{} after {}: {phases:?}", w[0], w[1]);
    }
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn a_guest_kernel_panic_is_reported_with_the_console_tail() {
    // No init at the given path and none at the fallback paths: the kernel panics.
    let out = bootbox(&[
        "run",
        "--append",
        "rdinit=/nonexistent init=/nonexistent",
        "--timeout",
        "600",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Kernel panic"), "no panic lines in: {err}");
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn ctrl_c_stops_the_vm_and_leaves_no_temporary_files() {
    use std::io::BufRead;
    let names = |dir: &Path| -> std::collections::BTreeSet<_> {
        std::fs::read_dir(dir)
            .map(|d| d.map(|e| e.unwrap().file_name()).collect())
            .unwrap_or_default()
    };
    // The appliance cache may live under the temporary directory (BOOTBOX_CACHE); it is meant
    // to stay, so it exists before the snapshot.
    let cache = appliance::default_cache_dir().unwrap();
    std::fs::create_dir_all(&cache).unwrap();
    let tmp_before = names(&std::env::temp_dir());

    // Ctrl-C while the first run of a new shape (--mem 304) boots the appliance to make its
    // warm-start snapshot: the run stops there, the job never starts, no temp file stays.
    let snapshots = cache.join("snapshot");
    let snaps_before = names(&snapshots);
    let mut child = Command::new(bootbox_bin())
        .args([
            "run",
            "--warm",
            "--mem",
            "304",
            "--timeout",
            "600",
            "--",
            "echo",
            "job-ran",
        ])
        .env("BOOTBOX_KERNEL", kernel())
        .env("BOOTBOX_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the run ended before it made a snapshot: {seen}"
        );
        seen.push_str(&line);
        if line.contains("making the warm-start snapshot") {
            break;
        }
    }
    // SAFETY: sending SIGINT to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    std::io::Read::read_to_string(&mut stderr, &mut seen).unwrap();
    assert_eq!(out.status.code(), Some(130), "{seen}");
    assert!(
        seen.contains("interrupted while making the warm-start snapshot"),
        "{seen}"
    );
    assert!(out.stdout.is_empty(), "the job ran: {:?}", out.stdout);
    let made: Vec<_> = names(&snapshots)
        .difference(&snaps_before)
        .filter(|n| {
            let n = n.to_string_lossy();
            // The lock file stays by design; a whole snapshot may have been published.
            n != ".lock" && !n.ends_with(".snap")
        })
        .cloned()
        .collect();
    assert!(made.is_empty(), "snapshot temp files left: {made:?}");
    // The next run of that shape makes the snapshot whole and resumes from it.
    let json = tempfile::NamedTempFile::new().unwrap();
    let out = bootbox(&[
        "run",
        "--warm",
        "--mem",
        "304",
        "--json",
        json.path().to_str().unwrap(),
        "--",
        "echo",
        "job-ran",
    ]);
    assert_eq!(stdout(&out), "job-ran\n");
    let record = std::fs::read_to_string(json.path()).unwrap();
    assert!(
        record.contains("\"state restored\""),
        "not resumed: {record}"
    );
    drop(json);

    // Ctrl-C while the job runs (warm or cold, as the suite runs).
    let mut child = Command::new(bootbox_bin())
        .args([
            "run",
            "--mem",
            "304",
            "--timeout",
            "600",
            "--",
            "sh",
            "-c",
            "echo job-is-running; exec sleep 1000",
        ])
        .env("BOOTBOX_KERNEL", kernel())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "job-is-running\n");
    // SAFETY: sending SIGINT to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    let tmp_after = names(&std::env::temp_dir());
    let left: Vec<_> = tmp_after.difference(&tmp_before).collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn concurrent_runs_work_and_share_one_appliance_build() {
    let cache = Scratch::new("concurrent-cache");
    let runs: Vec<_> = (0..3)
        .map(|i| {
            let cache = cache.path().to_path_buf();
            let json = cache.join(format!("run{i}.json"));
            std::thread::spawn(move || {
                let out = Command::new(bootbox_bin())
                    .args([
                        "run",
                        "--warm",
                        "--timeout",
                        "900",
                        "--json",
                        json.to_str().unwrap(),
                        "--",
                    ])
                    .args(["sh", "-c", &format!("echo run-{i}; exit {}", 10 + i)])
                    .env("BOOTBOX_KERNEL", kernel())
                    .env("BOOTBOX_CACHE", &cache)
                    .output()
                    .unwrap();
                (i, out, json)
            })
        })
        .collect();
    let mut built = 0;
    for r in runs {
        let (i, out, json) = r.join().unwrap();
        assert_eq!(
            out.status.code(),
            Some(10 + i),
            "run {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(stdout(&out), format!("run-{i}\n"));
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        if record["appliance_built"] == serde_json::Value::Bool(true) {
            built += 1;
        }
    }
    assert_eq!(
        built, 1,
        "exactly one of the concurrent runs builds the appliance"
    );
    let leftovers: Vec<_> = std::fs::read_dir(cache.path().join("appliance"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary build files left: {leftovers:?}"
    );
    // The three runs raced for the warm-start snapshot of this shape too: one made it, and
    // nothing half-written is left.
    let snapshots: Vec<_> = std::fs::read_dir(cache.path().join("snapshot"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".lock")
        .collect();
    assert!(
        snapshots.len() == 1 && snapshots[0].ends_with(".snap"),
        "expected one snapshot: {snapshots:?}"
    );
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn stats_report_exits_devices_and_9p_requests() {
    let tree = Scratch::new("stats");
    std::fs::write(tree.path().join("f"), b"data").unwrap();
    let out = bootbox(&[
        "run",
        "--stats",
        "--share",
        tree.s(),
        "--timeout",
        "600",
        "--",
        "cat",
        "f",
    ]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "data");
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "vm exit reason",
        "io-out",
        "exit-port",
        "virtio-9p",
        "walk",
        "read",
        "p95",
        "worker pool",
    ] {
        assert!(
            err.contains(needle),
            "{needle} missing from the stats report:\n{err}"
        );
    }
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn without_a_command_an_interactive_shell_runs_on_the_console() {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    let mut child = Command::new(bootbox_bin())
        .args(["run", "--timeout", "600"])
        .env("BOOTBOX_KERNEL", kernel())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut out = child.stdout.take().unwrap();
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        })
    };
    // Type only once the shell prompts, as a person would.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while !String::from_utf8_lossy(&seen.lock().unwrap()).contains("# ") {
        assert!(std::time::Instant::now() < deadline, "no shell prompt");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"echo interactive-$((6 * 7)) from a shell that reads more than sixty-four bytes; exit 3\n")
        .unwrap();
    let status = child.wait().unwrap();
    reader.join().unwrap();
    let text = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    assert!(text.contains("interactive-42 from a shell"), "{text}");
    assert_eq!(status.code(), Some(3), "{text}");
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn bench_summarises_phases_and_compares_with_another_command() {
    let scratch = Scratch::new("bench");
    let json = scratch.path().join("bench.json");
    let bin = bootbox_bin();
    // Cold (A, with the kernel's boot phases) against warm (B, the default).
    // B writes its record to bench's `{json}`, so its phases and memory compare too.
    let compare = format!(
        "{} run --timeout 600 --json {{json}} -- true",
        bin.display()
    );
    let out = bootbox(&[
        "bench",
        "--runs",
        "2",
        "--warmup",
        "1",
        "--json",
        json.to_str().unwrap(),
        "--compare",
        &compare,
        "--",
        "run",
        "--cold",
        "--timeout",
        "600",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    for needle in ["launch to init", "median", "p95", "stddev", "ratios A/B"] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let a = &doc["a"]["summary"];
    for phase in [
        "launch to init",
        "launch to job result",
        "kernel boot (first KVM_RUN to init)",
    ] {
        assert_eq!(a[phase]["n"], 2, "{phase}: {a}");
        assert!(a[phase]["min"].as_f64().unwrap() <= a[phase]["median"].as_f64().unwrap());
    }
    assert_eq!(doc["b"]["summary"]["end-to-end (wall)"]["n"], 2);
    assert_eq!(doc["b"]["summary"]["launch to job result"]["n"], 2);
    for side in ["a", "b"] {
        let touched = &doc[side]["samples"]["memory"]["guest memory touched (MiB)"];
        assert_eq!(touched.as_array().map(Vec::len), Some(2), "{side}: {doc}");
        assert!(touched[0].as_f64().unwrap() > 0.0, "{side}: {doc}");
    }
    assert!(text.contains("minor page faults"), "{text}");
    assert!(
        doc["ratios_a_over_b"]["guest memory touched (MiB)"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(
        doc["ratios_a_over_b"]["end-to-end (wall)"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}

// ---- failures before any VM starts: need no KVM ----

/// Runs bootbox with `args` and no KVM needed: it must fail as a launcher error (125) with a
/// message containing `needle` and no panic. Returns stderr.
fn launcher_error(args: &[&str], needle: &str) -> String {
    let out = Command::new(bootbox_bin()).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(err.contains(needle), "{needle:?} missing from: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn a_missing_share_is_a_launcher_error() {
    launcher_error(
        &["run", "--share", "/nonexistent/tree", "--", "true"],
        "/nonexistent/tree",
    );
}

#[test]
fn a_file_that_is_not_a_kernel_is_refused_clearly() {
    launcher_error(
        &["boot", "--kernel", "/etc/passwd", "--no-stdin"],
        "/etc/passwd",
    );
}

#[test]
fn cheap_checks_fail_before_the_appliance_is_built() {
    // A fresh cache stays empty: mem, vCPUs, timeout and the kernel's format are checked
    // first, and a kernel error is not blamed on the appliance.
    let cache = Scratch::new("early-checks-cache");
    let not_a_kernel = Scratch::new("early-checks-kernel");
    let bogus = not_a_kernel.path().join("vmlinux");
    std::fs::write(&bogus, vec![0u8; 4096]).unwrap();
    let k = std::env::var_os("BOOTBOX_KERNEL").map(PathBuf::from);
    let good = k.as_deref().filter(|k| k.is_file()).unwrap_or(&bogus);
    let good = good.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["run", "--timeout", "-1", "--", "true"],
            "--timeout -1: give a positive number",
        ),
        (
            vec!["run", "--timeout", "0", "--", "true"],
            "--timeout 0: give a positive number",
        ),
        (
            vec!["run", "--kernel", good, "--mem", "1", "--", "true"],
            "1 MiB",
        ),
        (
            vec!["run", "--kernel", good, "--vcpus", "0", "--", "true"],
            "vCPUs requested",
        ),
        (
            vec!["run", "--kernel", bogus.to_str().unwrap(), "--", "true"],
            "neither an ELF vmlinux nor a bzImage",
        ),
        (
            vec!["bench", "--runs", "0", "--", "run", "--", "true"],
            "--runs",
        ),
    ];
    for (args, needle) in cases {
        let out = Command::new(bootbox_bin())
            .args(&args)
            .env("BOOTBOX_CACHE", cache.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: {needle:?} missing from {err}"
        );
        assert!(!err.contains("the appliance:"), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
    let built: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
    assert!(built.is_empty(), "something was built: {built:?}");
}

#[test]
fn a_missing_kernel_says_how_to_build_one() {
    launcher_error(
        &["run", "--kernel", "/nonexistent/vmlinux", "--", "true"],
        "build-kernel.sh",
    );
}

#[test]
fn bad_arguments_are_launcher_errors() {
    launcher_error(&["run", "--timeout", "0", "--", "true"], "--timeout");
    launcher_error(&["run", "--env", "NOEQUALS", "--", "true"], "NAME=VALUE");
    launcher_error(&["run", "--no-such-flag"], "--no-such-flag");
}

#[test]
fn overlapping_shares_are_refused_before_anything_starts() {
    let tree = Scratch::new("overlap");
    let nest = tree.path().join("nest");
    std::fs::create_dir(&nest).unwrap();
    let nest = nest.to_str().unwrap();
    // A share inside another, in each flow that takes shares, and in either order.
    let err = launcher_error(
        &[
            "run",
            "--share",
            &format!("{}:a:rw", tree.s()),
            "--share",
            &format!("{nest}:b:ro"),
            "--",
            "true",
        ],
        "is inside",
    );
    assert!(
        err.contains(&format!("'b' ({nest}) is inside 'a'")),
        "{err}"
    );
    let out = tree.path().join("out.cpio");
    let out = out.to_str().unwrap();
    for args in [
        &[
            "initrd",
            "-o",
            out,
            "--share",
            &format!("{nest}:b"),
            "--share",
            tree.s(),
        ][..],
        &[
            "boot",
            "--no-stdin",
            "--share",
            &format!("{}:a", tree.s()),
            "--share",
            &format!("{nest}:b"),
        ][..],
    ] {
        launcher_error(args, "is inside");
    }
    assert!(
        !tree.path().join("out.cpio").exists(),
        "nothing may be written"
    );
    // The same directory twice, once through a symlink placed outside it.
    let link =
        std::env::temp_dir().join(format!("bootbox-e2e-overlap-link-{}", std::process::id()));
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(tree.path(), &link).unwrap();
    let err = Command::new(bootbox_bin())
        .args(["run", "--share", &format!("{}:a", tree.s())])
        .args(["--share", &format!("{}:b", link.display()), "--", "true"])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&link);
    let text = String::from_utf8_lossy(&err.stderr);
    assert_eq!(err.status.code(), Some(125), "{text}");
    assert!(text.contains("same directory"), "{text}");
}

#[test]
fn doctor_reports_each_check_and_its_verdict_matches_the_exit_status() {
    let out = Command::new(bootbox_bin()).arg("doctor").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for check in [
        "/dev/kvm",
        "hardware",
        "guest init",
        "appliance cache",
        "warm start",
    ] {
        assert!(text.contains(check), "{check} not checked:\n{text}");
    }
    let failed = text.lines().any(|l| l.starts_with("[FAIL]"));
    assert_eq!(
        out.status.code(),
        Some(if failed { 125 } else { 0 }),
        "{text}"
    );
    if failed {
        assert!(
            text.contains("fix:"),
            "a failed check must say what to fix:\n{text}"
        );
    }
    // This host has or lacks hardware virtualisation; doctor must say which.
    let hw = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap()
        .split_whitespace()
        .any(|f| f == "vmx" || f == "svm");
    assert_eq!(
        text.contains("[ ok ] KVM is hardware-accelerated"),
        hw,
        "{text}"
    );
}

#[test]
fn scripts_refuse_bad_arguments_before_doing_anything_and_print_their_help() {
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts");
    let run = |script: &str, args: &[&str]| {
        let o = Command::new("bash")
            .arg(scripts.join(script))
            .args(args)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // A bad mode is refused before any package is installed or kernel built.
    let (code, _, err) = run("bench-vm.sh", &["bogus"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("unknown mode 'bogus'"), "{err}");
    assert!(
        !err.contains("setup:") && !err.contains("build-kernel"),
        "{err}"
    );
    let (code, _, err) = run("bench-vm.sh", &["boot", "0"]);
    assert_eq!(code, Some(2), "{err}");
    // --help prints the usage comment, not a line of the script.
    for script in ["build-kernel.sh", "testhost.sh", "bench-vm.sh"] {
        let (code, out, _) = run(script, &["--help"]);
        assert_eq!(code, Some(0), "{script}");
        assert!(out.lines().count() > 3, "{script}: {out}");
        assert!(
            !out.contains("set -euo"),
            "{script} printed its body: {out}"
        );
    }
}

// ---- warm start ----

/// One warm run of `script` over `share` with `--json`: (stdout lines, exit code, stderr,
/// whether the run was resumed from a snapshot, host seconds before and after).
fn warm_run(
    share: &str,
    extra: &[&str],
    script: &str,
) -> (Vec<String>, Option<i32>, String, bool, (u64, u64)) {
    let json = tempfile::NamedTempFile::new().unwrap();
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let before = now();
    let mut args = vec![
        "run",
        "--mem",
        "320",
        "--timeout",
        "900",
        "--phases",
        "--share",
        share,
    ];
    if !extra.contains(&"--cold") {
        args.push("--warm");
    }
    args.extend_from_slice(extra);
    args.extend_from_slice(&[
        "--json",
        json.path().to_str().unwrap(),
        "--",
        "bash",
        "-c",
        script,
    ]);
    let out = bootbox(&args);
    let after = now();
    let record = std::fs::read_to_string(json.path()).unwrap();
    let resumed = record.contains("\"state restored\"");
    (
        stdout(&out).lines().map(str::to_string).collect(),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        resumed,
        (before, after),
    )
}

#[test]
#[ignore = "boots a real kernel: run by scripts/test.sh"]
fn warm_jobs_see_only_their_own_shares_match_cold_runs_and_get_fresh_time_and_randomness() {
    let a = Scratch::new("warm-a");
    std::fs::write(a.path().join("a.txt"), "alpha\n").unwrap();
    let b = Scratch::new("warm-b");
    std::fs::write(b.path().join("b.txt"), "beta\n").unwrap();
    // Shares, mounts, the job's own output and status; then the clock and 16 random bytes.
    let script = "ls /share; cat /share/*.txt; grep -c ' 9p ' /proc/mounts; echo \"$0 $1\"; \
                  printf '%(%s)T\\n' -1; head -c 16 /dev/urandom | sha256sum | cut -c1-32; exit 3";
    // The first run of this shape (--mem 320) makes the snapshot, then resumes from it.
    let (first, code1, err1, resumed1, _) = warm_run(a.s(), &[], script);
    assert!(!err1.contains("booting cold"), "{err1}");
    assert!(resumed1, "the first run resumed from the snapshot it made");
    assert_eq!(code1, Some(3));
    assert_eq!(
        &first[..3],
        ["a.txt", "alpha", "1"],
        "only share A is visible"
    );
    // Make the snapshot's own clock at least 3 s stale.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (second, code2, err2, resumed2, (before, after)) =
        warm_run(&format!("{}:rw", b.s()), &[], script);
    assert!(resumed2 && !err2.contains("booting cold"), "{err2}");
    assert_eq!(code2, Some(3));
    assert_eq!(
        &second[..3],
        ["b.txt", "beta", "1"],
        "only share B is visible"
    );
    let guest_time: u64 = second[4].parse().unwrap();
    assert!(
        guest_time + 2 >= before && guest_time <= after + 2,
        "warm guest clock {guest_time} outside the host's [{before}, {after}] +- 2 s"
    );
    assert_eq!(first[5].len(), 32);
    assert_ne!(
        first[5], second[5],
        "two restores read different random bytes"
    );
    // The same job cold: same output (clock and randomness aside) and status.
    let (cold, code3, _, resumed3, _) = warm_run(a.s(), &["--cold"], script);
    assert!(!resumed3, "--cold boots");
    assert_eq!(code3, code1);
    assert_eq!(cold[..4], first[..4]);
    assert_ne!(cold[5], first[5]);
    // Two vCPUs: a snapshot of their own shape, with both vCPUs restored and running.
    let (two, code4, err4, resumed4, _) = warm_run(
        a.s(),
        &["--vcpus", "2"],
        "grep -c ^processor /proc/cpuinfo; cat /share/a.txt",
    );
    assert!(resumed4, "{err4}");
    assert_eq!(code4, Some(0), "{err4}");
    assert_eq!(two, ["2", "alpha"], "both vCPUs online after the restore");
}
