//! The command line without a VM: argument errors, the share grammar and logging, checked on
//! the real `bootbox` binary. None of these need KVM: every run stops at a bogus kernel file
//! or earlier, so they run in a plain `cargo test`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bootbox() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bootbox"));
    c.env_remove("BOOTBOX_LOG");
    c
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A scratch directory with a file that is not a kernel (`vmlinux`, 4 KiB of zeros): a run
/// given it gets through argument and share checks, then stops without building anything.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vmlinux"), vec![0u8; 4096]).unwrap();
        Scratch { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn kernel(&self) -> String {
        self.path().join("vmlinux").display().to_string()
    }
    fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }
}

/// Runs `bootbox` and expects a launcher failure (125) without a panic; returns stderr.
fn fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn a_warning_reaches_stderr_by_default() {
    let t = Scratch::new();
    let err = fails(
        bootbox()
            .args(["run", "--kernel", &t.kernel(), "--", "true"])
            .env("BOOTBOX_LOG", "loud"),
    );
    assert!(
        err.contains("bootbox: warning: BOOTBOX_LOG=loud is not a level"),
        "{err}"
    );
    // And an explicit level can silence it.
    let err = fails(
        bootbox()
            .args(["run", "--kernel", &t.kernel(), "--", "true"])
            .env("BOOTBOX_LOG", "error"),
    );
    assert!(!err.contains("warning"), "{err}");
}

#[test]
fn logging_is_quiet_by_default_and_raised_by_v_or_bootbox_log() {
    let t = Scratch::new();
    let tree = t.subdir("tree");
    let run = |extra: &[&str], env: Option<&str>| {
        let mut c = bootbox();
        c.args(extra)
            .args(["run", "--kernel", &t.kernel(), "--share"]);
        c.arg(&tree).args(["--", "true"]);
        if let Some(level) = env {
            c.env("BOOTBOX_LOG", level);
        }
        fails(&mut c)
    };
    let info = format!("bootbox: share {} as tag 'tree', read-only", tree.display());
    let has_info = |err: &str| err.lines().any(|l| l == info);
    let has_debug = |err: &str| {
        err.lines()
            .any(|l| l.starts_with("bootbox: debug: [bootbox] open file limit: "))
    };
    let quiet = run(&[], None);
    assert!(
        quiet.contains("neither an ELF vmlinux nor a bzImage"),
        "{quiet}"
    );
    assert_eq!(quiet.lines().count(), 1, "only the error: {quiet}");
    let v = run(&["-v"], None);
    assert!(has_info(&v) && !has_debug(&v), "{v}");
    for vv in [run(&["-vv"], None), run(&[], Some("debug"))] {
        assert!(has_info(&vv) && has_debug(&vv), "{vv}");
    }
}

/// The line `-v` prints for each share, after parsing and checking.
fn share_lines(subcommand: &[&str], shares: &[&str], t: &Scratch) -> Vec<String> {
    let mut c = bootbox();
    c.arg("-v").args(subcommand).args(["--kernel", &t.kernel()]);
    for s in shares {
        c.args(["--share", s]);
    }
    let err = fails(&mut c);
    err.lines()
        .filter_map(|l| l.strip_prefix("bootbox: share "))
        .map(str::to_string)
        .collect()
}

#[test]
fn run_and_boot_share_one_grammar_and_one_default() {
    let t = Scratch::new();
    let a = t.subdir("a");
    let b = t.subdir("b");
    let (a, b) = (a.display().to_string(), b.display().to_string());
    for sub in [&["run"][..], &["boot", "--no-stdin"][..]] {
        let lines = share_lines(sub, &[&a, &format!("{b}:data:rw")], &t);
        assert_eq!(
            lines,
            [
                format!("{a} as tag 'a', read-only"),
                format!("{b} as tag 'data', read-write"),
            ],
            "{sub:?}"
        );
        let lines = share_lines(sub, &[&format!("{a}:ro")], &t);
        assert_eq!(lines, [format!("{a} as tag 'a', read-only")], "{sub:?}");
    }
}

#[test]
fn a_directory_with_a_colon_is_shared_with_a_backslash_escape() {
    let t = Scratch::new();
    let odd = t.subdir("x:y");
    let spec = format!("{}/x\\:y", t.path().display());
    let lines = share_lines(&["run"], &[&format!("{spec}:rw")], &t);
    assert_eq!(
        lines,
        [format!("{} as tag 'x_y', read-write", odd.display())]
    );
    let lines = share_lines(&["run"], &[&format!("{spec}:odd")], &t);
    assert_eq!(
        lines,
        [format!("{} as tag 'odd', read-only", odd.display())]
    );
    // The help says how.
    let help = bootbox().args(["run", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("Write a ':' in DIR as '\\:'"), "{help}");
    assert!(
        help.contains(&format!("1 to {} letters", guest_abi::MAX_SHARE_TAG_LEN)),
        "{help}"
    );
}

#[test]
fn derived_tags_are_numbered_and_given_ones_must_differ() {
    let t = Scratch::new();
    let one = t.subdir("1/tree").display().to_string();
    let two = t.subdir("2/tree").display().to_string();
    let lines = share_lines(&["run"], &[&one, &two], &t);
    assert_eq!(
        lines,
        [
            format!("{one} as tag 'tree', read-only"),
            format!("{two} as tag 'tree-2', read-only"),
        ]
    );
    let err = fails(bootbox().args([
        "run",
        "--kernel",
        &t.kernel(),
        "--share",
        &format!("{one}:same"),
        "--share",
        &format!("{two}:same"),
    ]));
    assert!(err.contains("two shares have the tag 'same'"), "{err}");
}

#[test]
fn each_share_error_says_what_is_wrong() {
    let t = Scratch::new();
    let d = t.subdir("d").display().to_string();
    let long = "t".repeat(guest_abi::MAX_SHARE_TAG_LEN + 1);
    let cases = [
        (
            format!("{d}:a:b:c"),
            "expected DIR[:TAG][:ro|rw]".to_string(),
        ),
        (
            format!("{d}:bad tag"),
            "share tag \"bad tag\" must be 1 to 36".into(),
        ),
        (format!("{d}:{long}"), format!("share tag \"{long}\"")),
        (format!("{d}:.hidden"), "not start with '.'".into()),
        (":tag".into(), "the directory is empty".into()),
        (t.kernel(), "is not a directory".into()),
        (format!("{d}/missing"), format!("cannot use {d}/missing")),
    ];
    for sub in ["run", "boot", "initrd"] {
        for (spec, needle) in &cases {
            let mut c = bootbox();
            c.arg(sub).args(["--share", spec]);
            if sub == "initrd" {
                c.args(["-o", &t.path().join("out").display().to_string()]);
            }
            let err = fails(&mut c);
            assert!(
                err.contains(needle.as_str()),
                "{sub} {spec}: {needle:?} in {err}"
            );
        }
    }
    assert!(!t.path().join("out").exists());
}

#[test]
fn a_missing_initrd_is_named() {
    let t = Scratch::new();
    let missing = t.path().join("no-initrd");
    let err = fails(
        bootbox()
            .args(["boot", "--no-stdin", "--kernel", &t.kernel(), "--initrd"])
            .arg(&missing),
    );
    assert!(
        err.contains(&format!("--initrd {}: no such file", missing.display())),
        "{err}"
    );
}

#[test]
fn passthrough_ownership_is_refused_to_ordinary_users() {
    use std::os::unix::process::CommandExt;
    let t = Scratch::new();
    let share = t.subdir("tree");
    let mut cmd = bootbox();
    cmd.args([
        "run",
        "--passthrough-ownership",
        "--kernel",
        &t.kernel(),
        "--share",
    ])
    .arg(format!("{}:data:rw", share.display()))
    .args(["--", "true"]);
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // As root, become an ordinary user for this one run (the check comes before any file
        // of the scratch directory is read).
        cmd.uid(4242).gid(4242);
    }
    let err = fails(&mut cmd);
    assert!(err.contains("--passthrough-ownership needs root"), "{err}");
}

// ---- --disk: every bad image is refused before anything boots ----

/// `bootbox run --disk SPEC -- true` with the bogus kernel: must fail with 125 on the disk
/// (never reaching the kernel check); returns stderr.
fn disk_refused(t: &Scratch, spec: &str) -> String {
    let err = fails(bootbox().args(["run", "--kernel", &t.kernel(), "--disk", spec, "--", "true"]));
    assert!(!err.contains("vmlinux"), "got past the disk check: {err}");
    assert!(err.contains("--disk"), "{err}");
    err
}

/// A qcow2 image made by qemu-img with `extra` options, or None (and why) without qemu-img.
fn qemu_img_create(t: &Scratch, name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = t.path().join(name);
    let out = Command::new("qemu-img")
        .arg("create")
        .arg("-q")
        .args(extra)
        .args(["-f", "qcow2"])
        .arg(&path)
        .arg("1M")
        .output();
    match out {
        Ok(o) if o.status.success() => Some(path),
        Ok(o) => {
            eprintln!("SKIP: qemu-img create failed: {}", stderr(&o).trim());
            None
        }
        Err(e) => {
            eprintln!("SKIP: no qemu-img ({e}); apt-get install qemu-utils");
            None
        }
    }
}

#[test]
fn disk_images_that_cannot_be_used_are_one_line_errors() {
    let t = Scratch::new();
    let missing = t.path().join("missing.img");
    let err = disk_refused(&t, missing.to_str().unwrap());
    assert!(
        err.contains("missing.img") && err.contains("No such file or directory"),
        "{err}"
    );

    let raw = t.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 65536]).unwrap();
    let err = disk_refused(&t, &format!("{}:qcow2", raw.display()));
    assert!(err.contains("is not a qcow2 image"), "{err}");
    let err = disk_refused(&t, &format!("{}:fast", raw.display()));
    assert!(err.contains("unknown option ':fast'"), "{err}");
    let err = disk_refused(&t, &format!("{}:ro:rw", raw.display()));
    assert!(err.contains("mode is given twice"), "{err}");

    // A qcow2 magic followed by a header that makes no sense (cluster_bits 0).
    let mut bad = b"QFI\xfb".to_vec();
    bad.extend_from_slice(&3u32.to_be_bytes());
    bad.resize(4096, 0);
    let corrupt = t.path().join("corrupt.qcow2");
    std::fs::write(&corrupt, &bad).unwrap();
    let err = disk_refused(&t, corrupt.to_str().unwrap());
    assert!(err.contains("invalid qcow2 header"), "{err}");

    // The same file named raw is a raw disk: it gets past the disk check to the kernel.
    let out = bootbox()
        .args(["run", "--kernel", &t.kernel(), "--disk"])
        .arg(format!("{}:raw", corrupt.display()))
        .args(["--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(stderr(&out).contains("vmlinux"), "{}", stderr(&out));

    // `bootbox initrd` checks its disks the same way.
    let err = fails(
        bootbox()
            .args(["initrd", "-o"])
            .arg(t.path().join("x.cpio"))
            .arg("--disk")
            .arg(&missing)
            .args(["--", "true"]),
    );
    assert!(err.contains("missing.img"), "{err}");
}

#[test]
fn encrypted_lying_and_writable_qcow2_images_are_refused() {
    let t = Scratch::new();
    let Some(plain) = qemu_img_create(&t, "plain.qcow2", &[]) else {
        return;
    };
    let err = disk_refused(&t, &format!("{}:rw", plain.display()));
    assert!(err.contains("opened read-only"), "{err}");

    // An L1 table "beyond" the end of the file: the header lies about the image's layout.
    let mut bytes = std::fs::read(&plain).unwrap();
    bytes[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
    let lying = t.path().join("lying.qcow2");
    std::fs::write(&lying, &bytes).unwrap();
    let err = disk_refused(&t, lying.to_str().unwrap());
    assert!(err.contains("lying.qcow2"), "{err}");

    let encrypted = qemu_img_create(
        &t,
        "encrypted.qcow2",
        &[
            "--object",
            "secret,id=sec0,data=bootbox-test-secret",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
        ],
    );
    if let Some(encrypted) = encrypted {
        let err = disk_refused(&t, encrypted.to_str().unwrap());
        assert!(
            err.contains("encrypted qcow2 images are not supported"),
            "{err}"
        );
    }
}

#[test]
fn cache_list_shows_appliances_and_snapshots_and_clear_removes_them() {
    let s = Scratch::new();
    let cache = s.subdir("cache");
    std::fs::create_dir_all(cache.join("appliance")).unwrap();
    std::fs::create_dir_all(cache.join("snapshot")).unwrap();
    std::fs::write(cache.join("appliance/abc.cpio"), vec![0u8; 3 << 20]).unwrap();
    std::fs::write(cache.join("snapshot/def.snap"), b"s").unwrap();
    let list = bootbox()
        .args(["cache", "list"])
        .env("BOOTBOX_CACHE", &cache)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&list.stdout);
    assert!(list.status.success(), "{}", stderr(&list));
    assert!(
        out.contains("appliance") && out.contains("abc") && out.contains("3.0 MiB"),
        "{out}"
    );
    assert!(out.contains("snapshot") && out.contains("def"), "{out}");
    assert!(out.contains("2 entries"), "{out}");
    let clear = bootbox()
        .args(["cache", "clear"])
        .env("BOOTBOX_CACHE", &cache)
        .output()
        .unwrap();
    assert!(clear.status.success(), "{}", stderr(&clear));
    assert!(!cache.join("appliance/abc.cpio").exists());
    assert!(!cache.join("snapshot/def.snap").exists());
}
