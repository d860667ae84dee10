//! Appliance builder tests against the real host: ELF closure versus the dynamic loader's
//! view (`ldd`, used here only as an oracle), cpio round trip through the system `cpio`,
//! determinism, and cache hit / miss / rebuild / concurrency behaviour.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use appliance::cache::assemble;
use appliance::elf::{closure, find_program};
use appliance::tree::{Node, Tree};
use appliance::{prepare, ApplianceError, ApplianceSpec};

mod common;
use common::scratch;

/// What `ldd` says the loader maps for `prog` (canonical paths, plus the interpreter).
fn ldd_set(prog: &Path) -> BTreeSet<PathBuf> {
    let out = Command::new("ldd").arg(prog).output().expect("ldd runs");
    assert!(out.status.success(), "ldd failed on {}", prog.display());
    let text = String::from_utf8(out.stdout).unwrap();
    let mut set = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        let path = if let Some((_, rhs)) = line.split_once("=>") {
            rhs.split_whitespace().next().unwrap_or("")
        } else {
            line.split_whitespace().next().unwrap_or("")
        };
        if path.starts_with('/') {
            set.insert(std::fs::canonicalize(path).unwrap());
        }
    }
    set
}

fn closure_set(prog: &Path) -> BTreeSet<PathBuf> {
    let c = closure(&[prog.to_path_buf()]).unwrap();
    let me = std::fs::canonicalize(prog).unwrap();
    c.files
        .iter()
        .map(|f| std::fs::canonicalize(f).unwrap())
        .filter(|f| *f != me)
        .collect()
}

#[test]
fn elf_closure_matches_the_dynamic_loader() {
    for name in ["ls", "find", "bash", "grep"] {
        let Ok(prog) = find_program(name) else {
            continue;
        };
        let ours = closure_set(&prog);
        let loader = ldd_set(&prog);
        assert!(!ours.is_empty(), "{name}: empty closure");
        assert_eq!(ours, loader, "closure of {name} differs from ldd");
    }
}

#[test]
fn scripts_bring_their_interpreter() {
    let d = scratch("script");
    let script = d.path().join("hello.sh");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let c = closure(std::slice::from_ref(&script)).unwrap();
    assert_eq!(c.files[0], script);
    assert!(c.files.contains(&PathBuf::from("/bin/sh")));
    let real_sh = std::fs::canonicalize("/bin/sh").unwrap();
    let canon: BTreeSet<_> = c
        .files
        .iter()
        .map(|f| std::fs::canonicalize(f).unwrap())
        .collect();
    assert!(canon.is_superset(&ldd_set(&real_sh)));
}

fn cpio_list(archive: &Path) -> Vec<String> {
    let out = Command::new("cpio")
        .args(["-it", "--quiet", "-F"])
        .arg(archive)
        .output()
        .expect("cpio runs");
    assert!(out.status.success(), "cpio -it failed: {out:?}");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn cpio_extract(archive: &Path, into: &Path) {
    let out = Command::new("cpio")
        .args(["-idm", "--quiet", "--no-absolute-filenames", "-F"])
        .arg(archive)
        .current_dir(into)
        .output()
        .expect("cpio runs");
    assert!(out.status.success(), "cpio -i failed: {out:?}");
}

#[test]
fn cpio_round_trips_through_system_cpio() {
    let d = scratch("cpio");
    let src = d.path().join("big.bin");
    // Odd size over 1 MiB to exercise streaming and padding.
    let data: Vec<u8> = (0..(1u32 << 20) + 13)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&src, &data).unwrap();
    let mut t = Tree::new();
    t.add_dir("/etc").unwrap();
    t.add_host_file_as("/data/big.bin", &src, Some(0o640))
        .unwrap();
    t.add_bytes("/data/x", 0o600, b"abc".to_vec()).unwrap();
    t.add_bytes("/data/empty", 0o755, Vec::new()).unwrap();
    t.add_bytes("/data/ünï code", 0o644, b"\n\0\n".to_vec())
        .unwrap();
    t.add_symlink("/data/link", "big.bin").unwrap();
    t.add_symlink("/abs", "/data/x").unwrap();
    let archive = d.path().join("out.cpio");
    let f = std::fs::File::create(&archive).unwrap();
    t.write_cpio(f).unwrap();

    let expect: Vec<String> = t.iter().map(|(p, _)| p.to_string()).collect();
    assert_eq!(cpio_list(&archive), expect);

    let root = d.path().join("root");
    std::fs::create_dir(&root).unwrap();
    cpio_extract(&archive, &root);
    assert_eq!(std::fs::read(root.join("data/big.bin")).unwrap(), data);
    assert_eq!(std::fs::read(root.join("data/x")).unwrap(), b"abc");
    assert_eq!(
        std::fs::read(root.join("data/ünï code")).unwrap(),
        b"\n\0\n"
    );
    assert_eq!(std::fs::read(root.join("data/empty")).unwrap(), b"");
    let mode = |p: &str| {
        std::fs::metadata(root.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("data/big.bin"), 0o640);
    assert_eq!(mode("data/x"), 0o600);
    assert_eq!(mode("data/empty"), 0o755);
    assert_eq!(mode("data"), 0o755);
    assert_eq!(
        std::fs::read_link(root.join("data/link")).unwrap(),
        PathBuf::from("big.bin")
    );
    assert_eq!(
        std::fs::read_link(root.join("abs")).unwrap(),
        PathBuf::from("/data/x")
    );
}

fn fake_init(dir: &Path) -> PathBuf {
    let p = dir.join("init");
    std::fs::write(&p, b"\x7fELF fake init for cache tests").unwrap();
    p
}

/// An executable script `mytool` in `dir`, for `--with`.
fn script_tool(dir: &Path) -> PathBuf {
    let tool = dir.join("mytool");
    std::fs::write(&tool, "#!/bin/sh\necho mytool\n").unwrap();
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    tool
}

fn spec(dir: &Path, init: &Path, extra: &[&str]) -> ApplianceSpec {
    ApplianceSpec {
        init: init.to_path_buf(),
        extra_programs: extra.iter().map(|s| s.to_string()).collect(),
        disk_tools: false,
        cache_dir: dir.join("cache"),
    }
}

#[test]
fn appliance_contains_tools_and_keeps_symlinks() {
    let d = scratch("tree");
    let init = fake_init(d.path());
    let (tree, key) = assemble(&spec(d.path(), &init, &[])).unwrap();
    assert_eq!(key.len(), 64);
    assert!(matches!(
        tree.get("/init"),
        Some(Node::HostFile { perm: 0o755, .. })
    ));
    assert!(matches!(
        tree.get("/dev/console"),
        Some(Node::CharDev {
            major: 5,
            minor: 1,
            ..
        })
    ));
    for dir in [
        "/proc", "/sys", "/dev", "/tmp", "/run", "/share", "/bootbox",
    ] {
        assert_eq!(tree.get(dir), Some(&Node::Dir), "{dir}");
    }
    // Host symlinks stay symlinks.
    for link in [
        "/lib64/ld-linux-x86-64.so.2",
        "/bin",
        "/bin/sh",
        "/usr/bin/sh",
        "/lib",
    ] {
        if let Ok(target) = std::fs::read_link(link) {
            if tree.get(link).is_some() {
                assert_eq!(
                    tree.get(link),
                    Some(&Node::Symlink(target.to_str().unwrap().to_string())),
                    "{link}"
                );
            }
        }
    }
    // /bin/sh must resolve inside the tree.
    assert!(tree.get("/bin/sh").is_some() || tree.get("/bin").is_some());
    let ls = std::fs::canonicalize(find_program("ls").unwrap()).unwrap();
    assert!(matches!(
        tree.get(ls.to_str().unwrap()),
        Some(Node::HostFile { .. })
    ));
    // A job script ending in `sync`, or using id/uname/df/awk, finds them.
    for tool in ["sync", "id", "uname", "df", "awk"] {
        let host = std::fs::canonicalize(find_program(tool).unwrap()).unwrap();
        assert!(
            matches!(
                tree.get(host.to_str().unwrap()),
                Some(Node::HostFile { .. })
            ),
            "{tool} is missing from the appliance"
        );
    }
    if find_program("file").is_ok() && Path::new("/usr/lib/file/magic.mgc").exists() {
        assert!(tree.get("/usr/lib/file/magic.mgc").is_some());
    }
}

#[test]
fn only_an_appliance_for_disks_takes_the_disk_only_tools() {
    let d = scratch("disk-tools");
    let init = fake_init(d.path());
    let plain = spec(d.path(), &init, &[]);
    let for_disks = ApplianceSpec {
        disk_tools: true,
        ..plain.clone()
    };
    let (tree, key) = assemble(&plain).unwrap();
    let (disk_tree, disk_key) = assemble(&for_disks).unwrap();
    assert_ne!(key, disk_key, "the disk tools must be part of the key");
    for tool in appliance::DISK_ONLY_TOOLS {
        let host = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        let path = String::from_utf8_lossy(&host.stdout).trim().to_string();
        let canonical = std::fs::canonicalize(&path).ok();
        let has = |t: &Tree| {
            canonical
                .as_ref()
                .is_some_and(|c| t.get(c.to_str().unwrap()).is_some())
        };
        assert!(!has(&tree), "{tool} in an appliance without disks");
        if path.is_empty() {
            eprintln!("{tool} is not on this host: only its absence is checked");
        } else {
            assert!(has(&disk_tree), "{tool} ({path}) missing for disks");
        }
    }
}

#[test]
fn missing_with_program_is_a_clear_error() {
    let d = scratch("missing");
    let init = fake_init(d.path());
    let err = prepare(&spec(d.path(), &init, &["definitely-not-a-program-xyz"])).unwrap_err();
    assert!(matches!(err, ApplianceError::Elf(_)));
    assert!(
        err.to_string()
            .starts_with("--with definitely-not-a-program-xyz: not found in PATH"),
        "{err}"
    );
}

#[test]
fn same_inputs_give_identical_archives() {
    let a = scratch("det-a");
    let b = scratch("det-b");
    let init = fake_init(a.path());
    let pa = prepare(&spec(a.path(), &init, &[])).unwrap();
    let pb = prepare(&spec(b.path(), &init, &[])).unwrap();
    assert!(pa.built && pb.built);
    assert_eq!(pa.key, pb.key);
    assert_eq!(
        std::fs::read(&pa.path).unwrap(),
        std::fs::read(&pb.path).unwrap()
    );
    let root = a.path().join("x");
    std::fs::create_dir(&root).unwrap();
    let names = cpio_list(&pa.path);
    assert!(names.contains(&"init".to_string()));
    assert!(names.iter().any(|n| n.ends_with("/ls")));
}

#[test]
fn cache_hit_miss_and_rebuild_on_change() {
    let d = scratch("cache");
    let init = fake_init(d.path());
    let tool = script_tool(d.path());
    let s = spec(d.path(), &init, &[tool.to_str().unwrap()]);

    let first = prepare(&s).unwrap();
    assert!(first.built);
    assert!(first.path.starts_with(d.path().join("cache/appliance")));
    assert_eq!(first.size, std::fs::metadata(&first.path).unwrap().len());
    let second = prepare(&s).unwrap();
    assert!(!second.built, "warm run must not build");
    assert_eq!(second.key, first.key);
    assert_eq!(second.path, first.path);

    // A changed host program (mtime) changes the key and rebuilds.
    let f = std::fs::File::options().write(true).open(&tool).unwrap();
    f.set_modified(SystemTime::now() - Duration::from_secs(3600))
        .unwrap();
    drop(f);
    let third = prepare(&s).unwrap();
    assert!(third.built);
    assert_ne!(third.key, first.key);
    // The tool is reachable through the guest PATH.
    let (tree, _) = assemble(&s).unwrap();
    assert_eq!(
        tree.get("/usr/local/bin/mytool"),
        Some(&Node::Symlink(tool.to_str().unwrap().to_string()))
    );

    // A changed init (same size, different content) changes the key too.
    std::fs::write(&init, b"\x7fELF fake init for cache tesTS").unwrap();
    let fourth = prepare(&s).unwrap();
    assert!(fourth.built);
    assert_ne!(fourth.key, third.key);
}

#[test]
fn the_assembly_memo_never_hides_a_changed_program() {
    let d = scratch("memo");
    let init = fake_init(d.path());
    let tool = script_tool(d.path());
    let s = spec(d.path(), &init, &[tool.to_str().unwrap()]);
    let memo_dir = d.path().join("cache/appliance/memo");
    let memos = || {
        std::fs::read_dir(&memo_dir)
            .map(|rd| rd.flatten().count())
            .unwrap_or(0)
    };
    // Files changed within the racy window give no memo.
    let first = prepare(&s).unwrap();
    assert!(first.built);
    assert_eq!(memos(), 0);
    // Once they are older, a walk leaves a memo, and the next run takes the key from it.
    std::thread::sleep(Duration::from_secs(appliance::memo::RACY_SECS as u64 + 1));
    let second = prepare(&s).unwrap();
    assert!(!second.built);
    assert_eq!(memos(), 1);
    let third = prepare(&s).unwrap();
    assert_eq!(
        (third.key.as_str(), third.built),
        (first.key.as_str(), false)
    );

    // Same size, mtime put back: only the ctime tells, and the key still changes.
    let mtime = std::fs::metadata(&tool).unwrap().modified().unwrap();
    std::fs::write(&tool, "#!/bin/sh\necho MYTOOL\n").unwrap();
    let f = std::fs::File::options().write(true).open(&tool).unwrap();
    f.set_modified(mtime).unwrap();
    drop(f);
    let fourth = prepare(&s).unwrap();
    assert!(fourth.built);
    assert_ne!(fourth.key, first.key);
}

#[test]
fn old_entries_are_pruned() {
    let d = scratch("prune");
    let init = fake_init(d.path());
    let s = spec(d.path(), &init, &[]);
    for i in 0..(appliance::cache::KEEP_ENTRIES + 2) {
        std::fs::write(&init, format!("\x7fELF fake init {i}")).unwrap();
        assert!(prepare(&s).unwrap().built);
    }
    let n = std::fs::read_dir(d.path().join("cache/appliance"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "cpio")
        })
        .count();
    assert_eq!(n, appliance::cache::KEEP_ENTRIES);
}

#[test]
fn concurrent_prepares_build_once() {
    let d = scratch("conc");
    let init = fake_init(d.path());
    let s = spec(d.path(), &init, &[]);
    let results: Vec<_> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..4).map(|_| sc.spawn(|| prepare(&s).unwrap())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|p| p.built).count(), 1);
    let bytes = std::fs::read(&results[0].path).unwrap();
    for r in &results {
        assert_eq!(r.path, results[0].path);
        assert_eq!(r.size as usize, bytes.len());
    }
    // No temp files are left behind.
    let leftovers = std::fs::read_dir(d.path().join("cache/appliance"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp.")
        })
        .count();
    assert_eq!(leftovers, 0);
}

#[test]
fn initramfs_is_base_then_job() {
    let d = scratch("initrd");
    let init = fake_init(d.path());
    let p = prepare(&spec(d.path(), &init, &[])).unwrap();
    let job = appliance::Job {
        argv: vec!["true".into()],
        ..appliance::Job::default()
    };
    let all = appliance::initramfs(&p, &job).unwrap();
    let base = std::fs::read(&p.path).unwrap();
    let job_cpio = appliance::job_cpio(&job).unwrap();
    assert_eq!(all.len(), base.len() + job_cpio.len());
    assert_eq!(&all[..base.len()], base.as_slice());
    assert_eq!(&all[base.len()..], job_cpio.as_slice());
    assert_eq!(
        base.len() % 4,
        0,
        "the job archive must start 4-byte aligned"
    );
}

/// Child side of [`concurrent_processes_build_once`]; run only by that test.
#[test]
#[ignore = "helper run in child processes by concurrent_processes_build_once"]
fn helper_prepare_in_child_process() {
    let dir =
        std::env::var("BOOTBOX_TEST_CONC_DIR").expect("run by concurrent_processes_build_once");
    let dir = PathBuf::from(dir);
    let p = prepare(&spec(&dir, &dir.join("init"), &[])).unwrap();
    println!("RESULT built={} key={}", p.built, p.key);
}

#[test]
fn concurrent_processes_build_once() {
    let d = scratch("conc-proc");
    fake_init(d.path());
    let exe = std::env::current_exe().unwrap();
    let children: Vec<_> = (0..4)
        .map(|_| {
            Command::new(&exe)
                .args([
                    "--ignored",
                    "--exact",
                    "helper_prepare_in_child_process",
                    "--nocapture",
                ])
                .env("BOOTBOX_TEST_CONC_DIR", d.path())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut built = 0;
    let mut keys = BTreeSet::new();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("RESULT "))
            .unwrap_or_else(|| panic!("child printed no result: {text}"));
        if line.contains("built=true") {
            built += 1;
        }
        keys.insert(line.split("key=").nth(1).unwrap().to_string());
    }
    assert_eq!(built, 1, "exactly one process builds");
    assert_eq!(keys.len(), 1);
}

#[test]
fn mutated_elf_headers_never_panic() {
    let d = scratch("elf-fuzz");
    let ls = std::fs::read(find_program("ls").unwrap()).unwrap();
    let head = &ls[..ls.len().min(64 * 1024)];
    let path = d.path().join("mutant");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut errors = 0;
    for round in 0..300 {
        let mut m = head.to_vec();
        if round % 10 == 0 {
            m.truncate((next() % 4096) as usize);
        }
        for _ in 0..(1 + next() % 8) {
            if m.is_empty() {
                break;
            }
            // Hit the ELF header and program headers most of the time.
            let span = if next() % 4 == 0 {
                m.len()
            } else {
                m.len().min(1024)
            };
            let i = (next() as usize) % span;
            m[i] = next() as u8;
        }
        std::fs::write(&path, &m).unwrap();
        if appliance::elf::inspect(&path).is_err() {
            errors += 1;
        }
    }
    // The truncated prefix cannot hold the dynamic section, so many mutants are rejected.
    assert!(errors > 0);
}
