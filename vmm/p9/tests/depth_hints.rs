//! The confinement check's depth hint (see `p9::confine`): a directory fid remembers how deep
//! below the root it was, and the check first asks whether its ancestor that many levels up is
//! the root. These tests move held directories on the host so that the remembered depth is
//! wrong, both inside the share (the fid must keep working) and out of it with an ancestor at
//! the remembered distance that is not the root (nothing may be reached through it).

mod common;

use common::*;
use p9::Config;

#[test]
fn a_directory_moved_within_the_share_keeps_working_at_its_new_depth() {
    let t = TempTree::new("depth-inside");
    t.file("share/a/b/inner", b"inner");
    std::fs::create_dir_all(t.join("share/x/y")).unwrap();
    let mut h = Harness::new(&t.join("share"), Config::default());
    h.walk_to(2, "a/b").unwrap();
    // Deeper: a/b (depth 2) is x/y/a/b (depth 4) now.
    std::fs::rename(t.join("share/a"), t.join("share/x/y/a")).unwrap();
    h.walk(2, 3, &["inner"]).unwrap();
    h.clunk(3).unwrap();
    // Shallower: b (depth 1), and then `..` from it is the root.
    std::fs::rename(t.join("share/x/y/a/b"), t.join("share/b")).unwrap();
    h.walk(2, 3, &["inner"]).unwrap();
    h.clunk(3).unwrap();
    let q = h.walk(2, 3, &["..", "b", "inner"]).unwrap();
    assert_eq!(q.len(), 3);
    assert_eq!(q[0].path, ino(&t.join("share")));
}

#[test]
fn a_directory_moved_out_at_the_same_depth_leads_nowhere() {
    // The share's root and a decoy beside it at the same depth, the secret next to both: the
    // held directory's ancestor two levels up becomes the decoy, never the root.
    let t = TempTree::new("depth-outside");
    t.file("secret", b"SECRET");
    t.file("share/a/b/inner", b"inner");
    std::fs::create_dir_all(t.join("decoy")).unwrap();
    let mut h = Harness::new(&t.join("share"), Config::default());
    h.walk_to(2, "a/b").unwrap();
    std::fs::rename(t.join("share/a"), t.join("decoy/a")).unwrap();
    assert_eq!(h.walk(2, 3, &["inner"]).unwrap_err(), libc::ENOENT);
    assert_eq!(
        h.walk(2, 3, &["..", "..", "..", "secret"]).unwrap_err(),
        libc::ENOENT
    );
    assert_eq!(h.lopen(2, 0).unwrap_err(), libc::ENOENT);
    // Moved back, it is inside again.
    std::fs::rename(t.join("decoy/a"), t.join("share/a")).unwrap();
    h.walk(2, 3, &["inner"]).unwrap();
}
