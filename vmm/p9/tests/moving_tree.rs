//! Escapes that need the tree to change under a held fid, and the refusals that must leave the
//! host as it was: a directory moved out of the share on the host, a directory renamed out of
//! an overlapping share, creates refused at a limit, a refused Tversion, deep paths, symlink
//! times, set-id bits, and host renames racing the walks.

mod common;

use common::*;
use p9::wire::{setattr, Rmessage, SetAttr, Tmessage};
use p9::{Config, Server, VecReply};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

fn lcreate(h: &mut Harness, fid: u32, name: &str, mode: u32) -> Result<(), i32> {
    h.lcreate(fid, name.as_bytes(), libc::O_RDWR as u32, mode, 0)
        .map(|_| ())
}

fn mkdir(h: &mut Harness, dfid: u32, name: &str) -> Result<(), i32> {
    h.mkdir(dfid, name.as_bytes(), 0o755, 0).map(|_| ())
}

/// Everything the guest can try from a fid whose directory is outside the share now. Returns
/// the names of the attempts that reached outside.
fn attempts_from(h: &mut Harness, held: u32, outside: &Path) -> Vec<&'static str> {
    let mut reached = Vec::new();
    // Climb: enough `..` to reach the host root from any temp dir, then down to the secret.
    let ups: Vec<&str> = std::iter::repeat_n("..", 12).collect();
    if let Ok(q) = h.walk(held, 900, &ups) {
        if q.len() == ups.len() {
            let _ = h.clunk(900);
        }
    }
    let mut climb: Vec<&str> = std::iter::repeat_n("..", 2).collect();
    climb.extend(["outside", "secret"]);
    if let Ok(q) = h.walk(held, 901, &climb) {
        if q.len() == climb.len() {
            reached.push("walk .. to the secret");
            if h.lopen(901, 0).is_ok() && h.read(901, 0, 64).ok().as_deref() == Some(b"SECRET") {
                reached.push("read the secret");
            }
        }
    }
    if lcreate(h, held, "planted", 0o644).is_ok() || outside.join("a/b/planted").exists() {
        reached.push("create in the moved directory");
    }
    if h.walk(held, 902, &["inner"]).is_ok() {
        reached.push("walk into the moved directory");
    }
    if h.lopen(held, 0).is_ok() {
        reached.push("open the moved directory");
    }
    reached
}

fn moved_tree(tag: &str) -> (TempTree, std::path::PathBuf) {
    let t = TempTree::new(tag);
    t.file("outside/secret", b"SECRET");
    t.file("share/a/b/inner", b"inner");
    let share = t.join("share");
    (t, share)
}

#[test]
fn a_directory_moved_out_on_the_host_leads_nowhere() {
    let (t, share) = moved_tree("moved-out");
    let mut h = Harness::new(&share, Config::default());
    h.walk_to(2, "a/b").unwrap();
    // The host moves share/a out, next to the secret.
    std::fs::rename(share.join("a"), t.join("a")).unwrap();
    let reached = attempts_from(&mut h, 2, &t.path);
    assert!(reached.is_empty(), "the guest reached outside: {reached:?}");
    assert_eq!(h.walk(2, 3, &[".."]).unwrap_err(), libc::ENOENT);
    assert!(!t.join("a/b/planted").exists());
    // Moved back in, the fid works again.
    std::fs::rename(t.join("a"), share.join("a")).unwrap();
    let q = h.walk(2, 4, &["inner"]).unwrap();
    assert_eq!(q.len(), 1);
    let q = h.walk(2, 5, &["..", ".."]).unwrap();
    assert_eq!(q[1].path, ino(&share));
}

#[test]
fn without_the_resolution_checks_the_same_attempts_escape() {
    // The attack is real: with the checks off (a test-only switch) it reaches the secret. The
    // end-to-end tests use the same switch to show that the process sandbox alone stops it.
    let (t, share) = moved_tree("moved-out-unchecked");
    let mut h = Harness::new(
        &share,
        Config {
            resolution_checks: false,
            ..Config::default()
        },
    );
    h.walk_to(2, "a/b").unwrap();
    std::fs::rename(share.join("a"), t.join("a")).unwrap();
    let reached = attempts_from(&mut h, 2, &t.path);
    assert!(
        reached.contains(&"read the secret"),
        "the unchecked server should have been escaped: {reached:?}"
    );
}

#[test]
fn a_directory_renamed_out_of_an_overlapping_share_leads_nowhere() {
    // Share a is the whole tree (rw); share b is a/nest (ro). Through a, the guest renames a
    // directory out of nest while b holds a fid in it.
    let t = TempTree::new("overlap");
    t.file("outside/secret", b"SECRET");
    t.file("nest/d/e/f", b"f");
    let mut a = Harness::new(&t.path, Config::default());
    let mut b = Harness::new(
        &t.join("nest"),
        Config {
            read_only: true,
            ..Config::default()
        },
    );
    b.walk_to(2, "d/e").unwrap();
    a.walk_to(2, "nest").unwrap();
    a.call(&Tmessage::Renameat {
        olddirfid: 2,
        oldname: b"d",
        newdirfid: ROOT,
        newname: b"d",
    })
    .unwrap();
    // From b: `..` twice would be t's root, where `outside` lives.
    assert_eq!(b.walk(2, 3, &["..", ".."]).unwrap_err(), libc::ENOENT);
    assert_eq!(
        b.walk(2, 3, &["..", "..", "outside", "secret"])
            .unwrap_err(),
        libc::ENOENT
    );
    assert_eq!(b.walk(2, 3, &["f"]).unwrap_err(), libc::ENOENT);
    assert_eq!(b.lopen(2, 0).unwrap_err(), libc::ENOENT);
}

#[test]
fn refused_creates_leave_nothing_behind() {
    let t = TempTree::new("no-side-effects");
    let mut h = Harness::new(
        &t.path,
        Config {
            max_fids: 3,
            max_open_files: 1,
            ..Config::default()
        },
    );
    // Fid cap: the root plus two more; a create replaces its fid, so it fits at the cap...
    h.walk(ROOT, 2, &[]).unwrap();
    h.walk(ROOT, 3, &[]).unwrap();
    assert_eq!(h.walk(ROOT, 4, &[]).unwrap_err(), libc::ENFILE);
    lcreate(&mut h, 2, "fits", 0o644).unwrap();
    assert!(t.join("fits").exists());
    // ... but not over the open-file cap, and then nothing is created.
    assert_eq!(
        lcreate(&mut h, 3, "refused", 0o644).unwrap_err(),
        libc::EMFILE
    );
    assert!(!t.join("refused").exists(), "a refused create made a file");
    // A create that fails on the host (name taken) leaves the existing file alone.
    h.clunk(2).unwrap();
    std::fs::write(t.join("taken"), b"keep").unwrap();
    assert_eq!(
        lcreate(&mut h, 3, "taken", 0o644).unwrap_err(),
        libc::EEXIST
    );
    assert_eq!(std::fs::read(t.join("taken")).unwrap(), b"keep");
    // Refused names create nothing either.
    for bad in ["..", ".", "a/b", ""] {
        assert!(lcreate(&mut h, 3, bad, 0o644).is_err(), "{bad:?}");
        assert!(mkdir(&mut h, ROOT, bad).is_err(), "{bad:?}");
    }
    let names: Vec<_> = std::fs::read_dir(&t.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

#[test]
fn a_refused_tversion_keeps_the_session() {
    let t = TempTree::new("bad-version");
    t.file("f", b"x");
    let mut h = Harness::new(&t.path, Config::default());
    h.walk_to(2, "f").unwrap();
    assert_eq!(
        h.call(&Tmessage::Version {
            msize: 100,
            version: b"9P2000.L"
        })
        .unwrap_err(),
        libc::EINVAL
    );
    assert_eq!(
        h.srv.session_usage().0,
        2,
        "the fids survive a refused Tversion"
    );
    h.getattr(2).unwrap();
}

#[test]
fn sessions_have_their_own_caps() {
    let t = TempTree::new("session-caps");
    let config = Config {
        max_fids: 4,
        ..Config::default()
    };
    let mut h = Harness::new(&t.path, config);
    for fid in 2..=4 {
        h.walk(ROOT, fid, &[]).unwrap();
    }
    assert_eq!(h.walk(ROOT, 5, &[]).unwrap_err(), libc::ENFILE);
    // A full session does not lock another one out.
    let other: std::sync::Arc<Server> = h.srv.new_session();
    let mut b = Vec::new();
    let mut r = VecReply::new(8192);
    for fid in 0..4u32 {
        b.clear();
        anonymous_attach(fid).encode(1, &mut b);
        let n = other.handle(&b, &mut r);
        let (_, rep) = Rmessage::decode(&r.as_slice()[..n]).unwrap();
        assert!(matches!(rep, Rmessage::Attach { .. }), "{rep:?}");
    }
    assert_eq!(other.session_usage().0, 4);
    assert_eq!(h.srv.session_usage().0, 4);
}

#[test]
fn remove_and_rename_work_below_path_max() {
    // A chain deeper than PATH_MAX: Tremove and Trename find the entry without a path.
    let t = TempTree::new("deep");
    let comp = "d".repeat(250);
    let mut h = Harness::new(&t.path, Config::default());
    let mut fid = ROOT;
    for i in 0..20u32 {
        mkdir(&mut h, fid, &comp).unwrap();
        h.walk(fid, 100 + i, &[&comp]).unwrap();
        fid = 100 + i;
    }
    h.walk(fid, 50, &[]).unwrap();
    lcreate(&mut h, 50, "leaf", 0o644).unwrap();
    h.walk(fid, 51, &["leaf"]).unwrap();
    h.call(&Tmessage::Rename {
        fid: 51,
        dfid: fid,
        name: b"renamed",
    })
    .unwrap();
    h.walk(fid, 52, &["renamed"]).unwrap();
    h.call(&Tmessage::Remove { fid: 52 }).unwrap();
    assert_eq!(h.walk(fid, 53, &["renamed"]).unwrap_err(), libc::ENOENT);
    let _ = std::process::Command::new("rm")
        .arg("-rf")
        .arg(&t.path)
        .status();
}

#[test]
fn symlink_times_are_set_on_the_link_itself() {
    let t = TempTree::new("symlink-times");
    t.file("target", b"x");
    std::os::unix::fs::symlink("target", t.join("link")).unwrap();
    let target_mtime = std::fs::metadata(t.join("target")).unwrap().mtime();
    let mut h = Harness::new(&t.path, Config::default());
    h.walk_to(2, "link").unwrap();
    h.setattr(
        2,
        SetAttr {
            valid: setattr::MTIME | setattr::MTIME_SET | setattr::ATIME | setattr::ATIME_SET,
            atime_sec: 1_000_000,
            mtime_sec: 2_000_000,
            ..Default::default()
        },
    )
    .unwrap();
    let m = std::fs::symlink_metadata(t.join("link")).unwrap();
    assert_eq!(m.mtime(), 2_000_000);
    assert_eq!(m.atime(), 1_000_000);
    assert_eq!(
        std::fs::metadata(t.join("target")).unwrap().mtime(),
        target_mtime,
        "the target must not change"
    );
}

#[test]
fn set_id_bits_never_reach_the_host() {
    let t = TempTree::new("setid");
    let mut h = Harness::new(&t.path, Config::default());
    h.walk(ROOT, 2, &[]).unwrap();
    lcreate(&mut h, 2, "suid", 0o6755).unwrap();
    let mode = |p: &str| std::fs::metadata(t.join(p)).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode("suid") & 0o6000, 0, "lcreate kept a set-id bit");
    h.walk_to(3, "suid").unwrap();
    h.setattr(
        3,
        SetAttr {
            valid: setattr::MODE,
            mode: 0o4755,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(mode("suid") & 0o6000, 0, "setattr kept a set-id bit");
    h.mkdir(ROOT, b"sgid", 0o2755, 0).unwrap();
    assert_eq!(mode("sgid") & 0o6000, 0, "mkdir kept a set-id bit");
}

/// [`moved_tree`] with one more file, served with the default configuration.
fn moved_tree_with(tag: &str, file: &str) -> (TempTree, std::path::PathBuf, Harness) {
    let (t, share) = moved_tree(tag);
    t.file(file, b"");
    let h = Harness::new(&share, Config::default());
    (t, share, h)
}

#[test]
fn a_walk_through_a_replaced_directory_lands_in_the_new_one() {
    // Walks keep the descriptors of directories they pass through: one replaced on the host
    // (moved away, a new one made under its name) must not be walked through again.
    let (t, share, mut h) = moved_tree_with("replaced", "share/a/b/old-only");
    h.walk_to(2, "a/b/inner").unwrap();
    h.clunk(2).unwrap();
    std::fs::rename(share.join("a"), t.join("a-moved")).unwrap();
    t.file("share/a/b/new-only", b"new");
    // A partial walk: the last name is not in the new directory.
    assert_eq!(h.walk(1, 3, &["a", "b", "old-only"]).unwrap().len(), 2);
    let q = h.walk(1, 4, &["a", "b", "new-only"]).unwrap();
    assert_eq!(q[0].path, ino(&share.join("a")));
    assert_eq!(q[1].path, ino(&share.join("a/b")));
    assert_eq!(q[2].path, ino(&share.join("a/b/new-only")));
    // The moved directory is gone from the share: nothing reaches it through its old name.
    assert_eq!(h.walk(1, 5, &["a", "b", "inner"]).unwrap().len(), 2);
    // A symlink put where a kept directory was is not followed.
    std::fs::remove_dir_all(share.join("a")).unwrap();
    std::os::unix::fs::symlink(t.join("a-moved"), share.join("a")).unwrap();
    assert_eq!(h.walk(1, 6, &["a", "b"]).unwrap().len(), 1);
    let q = h.walk(1, 7, &["a"]).unwrap();
    assert_eq!(q[0].ty, p9::wire::QTSYMLINK);
}

#[test]
fn opening_a_directory_whose_name_now_leads_elsewhere_opens_the_fids_own() {
    // A directory is opened by name in the directory it was walked in when that name still
    // leads to it; when another directory has taken the name, the fid's own one is opened.
    let (t, share, mut h) = moved_tree_with("reopen-dir", "share/a/b/mine");
    h.walk_to(2, "a/b").unwrap();
    h.walk_to(3, "a/b").unwrap();
    std::fs::rename(share.join("a/b"), share.join("a/b-old")).unwrap();
    t.file("share/a/b/theirs", b"");
    let names = |h: &mut Harness, fid| {
        h.lopen(fid, 0).unwrap();
        let mut n: Vec<String> = h
            .readdir_all(fid, 8192)
            .unwrap()
            .iter()
            .map(|e| String::from_utf8_lossy(&e.name).into_owned())
            .filter(|n| n != "." && n != "..")
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&mut h, 2), ["inner", "mine"]);
    // A symlink to the other directory under the old name is not followed either.
    std::fs::remove_dir_all(share.join("a/b")).unwrap();
    std::os::unix::fs::symlink(share.join("a/b-old"), share.join("a/b")).unwrap();
    assert_eq!(names(&mut h, 3), ["inner", "mine"]);
}

/// The host moves `share/a` out next to the secret and back, over and over, while the client
/// walks into `a/b` and climbs from there (and from the root through `a/b`) towards the
/// secret. Returns what reached it and how many walks into `a/b` succeeded.
fn race_moves_against_walks(tag: &str, resolution_checks: bool) -> (Vec<&'static str>, usize) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (t, share) = moved_tree(tag);
    let mut h = Harness::new(
        &share,
        Config {
            resolution_checks,
            ..Config::default()
        },
    );
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let mover = {
        let (stop, inside, outside) = (stop.clone(), share.join("a"), t.join("a"));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::rename(&inside, &outside);
                std::thread::yield_now();
                let _ = std::fs::rename(&outside, &inside);
                std::thread::yield_now();
            }
        })
    };
    let mut reached = Vec::new();
    let mut held = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while std::time::Instant::now() < deadline && reached.is_empty() {
        let up_and_out = ["..", "..", "outside", "secret"];
        if h.walk_to(2, "a/b").is_ok() {
            held += 1;
            if h.walk(2, 3, &up_and_out).map(|q| q.len()) == Ok(up_and_out.len()) {
                reached.push("walk from a/b to the secret");
                if h.lopen(3, 0).is_ok() && h.read(3, 0, 64).ok().as_deref() == Some(b"SECRET") {
                    reached.push("read the secret");
                }
            }
        }
        let through = ["a", "b", "..", "..", "..", "outside", "secret"];
        if h.walk(ROOT, 4, &through).map(|q| q.len()) == Ok(through.len()) {
            reached.push("walk from the root through a/b to the secret");
        }
        for fid in [2, 3, 4] {
            let _ = h.clunk(fid);
        }
    }
    stop.store(true, Ordering::Relaxed);
    mover.join().unwrap();
    (reached, held)
}

#[test]
fn renames_racing_walks_never_lead_out_of_the_share() {
    let (reached, held) = race_moves_against_walks("race-checked", true);
    assert!(reached.is_empty(), "the guest reached outside: {reached:?}");
    assert!(held > 0, "no walk into a/b succeeded: the race never ran");
}

#[test]
fn without_the_resolution_checks_renames_racing_walks_escape() {
    // The race is real: with the checks off (a test-only switch) it reaches the secret.
    let (reached, _) = race_moves_against_walks("race-unchecked", false);
    assert!(
        reached.contains(&"read the secret"),
        "the unchecked server should have been escaped: {reached:?}"
    );
}
