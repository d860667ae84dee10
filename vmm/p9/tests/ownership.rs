//! Ownership on writable shares: the guest reads back the owner, group, mode (set-id bits
//! included) and device numbers it set, while the host only ever gets files owned by the
//! server's user, without set-id bits, and no device nodes or FIFOs.

mod common;

use common::*;
use p9::wire::{self, setattr, SetAttr, Tmessage};
use p9::{Config, Ownership};
use std::os::unix::fs::{FileTypeExt, MetadataExt};

const GUEST: u32 = 50;

/// A harness plus a second attach as guest user 1000.
fn as_user_1000(t: &TempTree) -> Harness {
    let mut h = Harness::new(&t.path, Config::default());
    h.call(&Tmessage::Attach {
        fid: GUEST,
        afid: wire::NOFID,
        uname: b"user",
        aname: b"",
        n_uname: 1000,
    })
    .unwrap();
    h
}

fn lcreate(h: &mut Harness, dir: u32, newfid: u32, name: &str, mode: u32, gid: u32) {
    h.walk(dir, newfid, &[]).unwrap();
    h.lcreate(newfid, name.as_bytes(), libc::O_RDWR as u32, mode, gid)
        .unwrap();
}

fn me() -> (u32, u32) {
    // SAFETY: getuid/getgid cannot fail.
    unsafe { (libc::getuid(), libc::getgid()) }
}

#[test]
fn the_guest_reads_back_what_it_set_and_the_host_keeps_its_own() {
    let t = TempTree::new("mapped");
    let mut h = as_user_1000(&t);
    lcreate(&mut h, GUEST, 2, "tool", 0o6755, 100);
    let a = h.getattr(2).unwrap();
    assert_eq!((a.uid, a.gid), (1000, 100));
    assert_eq!(a.mode, libc::S_IFREG | 0o6755);
    let m = std::fs::metadata(t.join("tool")).unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        me(),
        "the host file belongs to the server's user"
    );
    assert_eq!(m.mode() & 0o7000, 0, "no set-id bit on the host");

    // chown and chmod: the guest sees them, the host does not change owner.
    h.setattr(
        2,
        SetAttr {
            valid: setattr::UID | setattr::GID | setattr::MODE,
            uid: 0,
            gid: 0,
            mode: 0o4700,
            ..Default::default()
        },
    )
    .unwrap();
    let a = h.getattr(2).unwrap();
    assert_eq!((a.uid, a.gid, a.mode), (0, 0, libc::S_IFREG | 0o4700));
    let m = std::fs::metadata(t.join("tool")).unwrap();
    assert_eq!((m.uid(), m.gid()), me());
    assert_eq!(m.mode() & 0o7777, 0o700);

    // chmod 000 in the guest still leaves the server able to use the file.
    h.setattr(
        2,
        SetAttr {
            valid: setattr::MODE,
            mode: 0,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(h.getattr(2).unwrap().mode, libc::S_IFREG);
    assert_eq!(
        std::fs::metadata(t.join("tool")).unwrap().mode() & 0o600,
        0o600
    );

    // Directories too.
    h.mkdir(GUEST, b"home", 0o1770, 100).unwrap();
    h.walk(GUEST, 3, &["home"]).unwrap();
    let a = h.getattr(3).unwrap();
    assert_eq!((a.uid, a.gid, a.mode), (1000, 100, libc::S_IFDIR | 0o1770));
}

#[test]
fn device_nodes_and_fifos_are_stand_ins_on_the_host() {
    let t = TempTree::new("mapped-nodes");
    let mut h = as_user_1000(&t);
    for (name, ty, major, minor) in [
        ("null", libc::S_IFCHR, 1, 3),
        ("disk", libc::S_IFBLK, 8, 0),
        ("fifo", libc::S_IFIFO, 0, 0),
        ("sock", libc::S_IFSOCK, 0, 0),
    ] {
        h.call(&Tmessage::Mknod {
            dfid: GUEST,
            name: name.as_bytes(),
            mode: ty | 0o666,
            major,
            minor,
            gid: 100,
        })
        .unwrap();
        let host = std::fs::symlink_metadata(t.join(name)).unwrap();
        assert!(
            host.file_type().is_file(),
            "{name} must be a regular file on the host"
        );
        assert!(!host.file_type().is_fifo() && !host.file_type().is_char_device());
        h.walk(GUEST, 10, &[name]).unwrap();
        let a = h.getattr(10).unwrap();
        assert_eq!(a.mode, ty | 0o666, "{name}");
        assert_eq!((a.uid, a.gid), (1000, 100));
        if ty == libc::S_IFCHR || ty == libc::S_IFBLK {
            assert_eq!(a.rdev, libc::makedev(major, minor), "{name}");
        }
        h.clunk(10).unwrap();
    }
}

#[test]
fn files_the_guest_never_touched_report_the_host_values() {
    let t = TempTree::new("mapped-untouched");
    t.file("plain", b"x");
    let mut h = as_user_1000(&t);
    h.walk(GUEST, 2, &["plain"]).unwrap();
    let a = h.getattr(2).unwrap();
    let m = std::fs::metadata(t.join("plain")).unwrap();
    assert_eq!((a.uid, a.gid, a.mode), (m.uid(), m.gid(), m.mode()));
}

#[test]
fn passthrough_refuses_device_nodes_and_strips_set_id_bits() {
    let t = TempTree::new("passthrough");
    let mut h = Harness::new(
        &t.path,
        Config {
            ownership: Ownership::Passthrough,
            ..Config::default()
        },
    );
    let r = h.call(&Tmessage::Mknod {
        dfid: ROOT,
        name: b"null",
        mode: libc::S_IFCHR | 0o666,
        major: 1,
        minor: 3,
        gid: 0,
    });
    assert_eq!(r.unwrap_err(), libc::EPERM);
    assert!(!t.join("null").exists());
    lcreate(&mut h, ROOT, 2, "suid", 0o4755, 0);
    assert_eq!(
        std::fs::metadata(t.join("suid")).unwrap().mode() & 0o7000,
        0
    );
    assert!(matches!(h.getattr(2), Ok(a) if a.mode & 0o7000 == 0));
    // And a read-only share never reads or writes the guest's view.
    let ro = TempTree::new("ro-view");
    ro.file("f", b"x");
    let mut r = Harness::new(
        &ro.path,
        Config {
            read_only: true,
            ..Config::default()
        },
    );
    r.walk_to(2, "f").unwrap();
    let m = std::fs::metadata(ro.join("f")).unwrap();
    assert_eq!(r.getattr(2).unwrap().uid, m.uid());
}

#[test]
fn symlinks_keep_the_guest_owner_the_guest_gave_them_and_the_host_link_is_untouched() {
    let t = TempTree::new("symlink-owner");
    let mut h = as_user_1000(&t);
    h.walk(GUEST, 2, &[]).unwrap();
    h.call(&Tmessage::Symlink {
        fid: 2,
        name: b"link",
        target: b"/etc/passwd",
        gid: 100,
    })
    .unwrap();
    h.walk(GUEST, 3, &["link"]).unwrap();
    let a = h.getattr(3).unwrap();
    assert_eq!(
        (a.uid, a.gid),
        (1000, 100),
        "created by guest user 1000, group 100"
    );
    assert_eq!(a.mode & libc::S_IFMT, libc::S_IFLNK);

    // lchown: only the group, then only the owner. Each changes the link's ctime (as a chown
    // does), and nothing else of the host's link.
    let host_times = || {
        let m = std::fs::symlink_metadata(t.join("link")).unwrap();
        ((m.ctime(), m.ctime_nsec()), (m.mtime(), m.mtime_nsec()))
    };
    for (valid, uid, gid, want) in [
        (setattr::GID, 0, 7, (1000, 7)),
        (setattr::UID, 65534, 0, (65534, 7)),
    ] {
        let (ctime_before, mtime_before) = host_times();
        // Past the kernel's coarse clock tick, so a new ctime is a larger one.
        std::thread::sleep(std::time::Duration::from_millis(30));
        h.setattr(
            3,
            SetAttr {
                valid,
                uid,
                gid,
                ..Default::default()
            },
        )
        .unwrap();
        let a = h.getattr(3).unwrap();
        assert_eq!((a.uid, a.gid), want);
        let (ctime_after, mtime_after) = host_times();
        assert!(
            ctime_after > ctime_before,
            "lchown changes the link's ctime"
        );
        assert_eq!(mtime_after, mtime_before, "and keeps its mtime");
    }
    let m = std::fs::symlink_metadata(t.join("link")).unwrap();
    assert_eq!((m.uid(), m.gid()), me(), "the host symlink keeps its owner");
    assert_eq!(
        std::fs::read_link(t.join("link")).unwrap(),
        std::path::Path::new("/etc/passwd")
    );

    // A symlink the host made and the guest never touched shows the host's owner.
    std::os::unix::fs::symlink("x", t.join("host-link")).unwrap();
    h.walk(ROOT, 4, &["host-link"]).unwrap();
    let a = h.getattr(4).unwrap();
    assert_eq!((a.uid, a.gid), me());
}
