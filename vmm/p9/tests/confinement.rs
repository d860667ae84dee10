//! Confinement and robustness: escape attempts, special files, read-only shares, fid and
//! open-file limits, malformed messages, and many threads calling `handle` at once.

mod common;

use common::*;
use p9::wire::{self, msg, setattr, Rmessage, SetAttr, Tmessage, WalkNames};
use p9::{Config, ReplyBuf, VecReply};
use std::sync::Arc;

/// A tree with a secret outside the share and many ways of pointing at it.
fn escape_tree() -> (TempTree, std::path::PathBuf) {
    let t = TempTree::new("escape");
    t.file("outside/secret", b"SECRET");
    let share = t.join("share");
    std::fs::create_dir_all(share.join("sub")).unwrap();
    std::fs::write(share.join("sub/ok"), b"ok").unwrap();
    std::os::unix::fs::symlink("/", share.join("to_root")).unwrap();
    std::os::unix::fs::symlink(t.join("outside"), share.join("abs_out")).unwrap();
    std::os::unix::fs::symlink("../outside", share.join("rel_out")).unwrap();
    std::os::unix::fs::symlink("../outside/secret", share.join("secret_link")).unwrap();
    std::os::unix::fs::symlink("sub", share.join("sub_link")).unwrap();
    std::os::unix::fs::symlink("/dev/null", share.join("devnull")).unwrap();
    (t, share)
}

#[test]
fn dotdot_is_clamped_at_the_root() {
    let (t, share) = escape_tree();
    let mut h = Harness::new(&share, Config::default());
    let root_ino = ino(&share);
    let q = h.walk(ROOT, 2, &[".."]).unwrap();
    assert_eq!(q[0].path, root_ino);
    let q = h.walk(ROOT, 3, &["..", "..", "..", ".."]).unwrap();
    assert!(q.iter().all(|q| q.path == root_ino));
    assert_eq!(
        h.walk(ROOT, 4, &["..", "outside"]).unwrap().len(),
        1,
        "outside must not be reachable"
    );
    let q = h.walk(ROOT, 5, &["sub", "..", "..", "sub", "ok"]).unwrap();
    assert_eq!(q.len(), 5);
    assert_eq!(q[1].path, root_ino);
    assert_eq!(q[2].path, root_ino);
    // A walk from a subdirectory: `..` goes up to the root and no further.
    h.walk_to(6, "sub").unwrap();
    let q = h.walk(6, 7, &["..", ".."]).unwrap();
    assert_eq!(q[1].path, root_ino);
    drop(t);
}

#[test]
fn symlinks_are_never_followed() {
    let (_t, share) = escape_tree();
    let mut h = Harness::new(&share, Config::default());
    for link in ["to_root", "abs_out", "rel_out", "sub_link"] {
        // The link itself can be walked to (it is a symlink qid) ...
        let q = h.walk(ROOT, 10, &[link]).unwrap();
        assert_eq!(q[0].ty, wire::QTSYMLINK, "{link}");
        // ... but never through.
        let q = h.walk(ROOT, 11, &[link, "secret"]).unwrap();
        assert_eq!(q.len(), 1, "walking through {link} must stop at the link");
        assert_eq!(
            h.walk(10, 11, &["etc"]).unwrap_err(),
            libc::ENOTDIR,
            "{link}"
        );
        // Opening the link fails instead of opening its target.
        assert_eq!(h.lopen(10, 0).unwrap_err(), libc::ELOOP, "{link}");
        h.clunk(10).unwrap();
    }
    for link in ["secret_link", "devnull"] {
        h.walk_to(12, link).unwrap();
        assert_eq!(h.lopen(12, 0).unwrap_err(), libc::ELOOP);
        // getattr describes the link, not its target.
        let a = h.getattr(12).unwrap();
        assert_eq!(a.mode & libc::S_IFMT, libc::S_IFLNK);
        h.clunk(12).unwrap();
    }
    // Names with slashes are refused rather than resolved.
    for bad in ["sub/ok", "/", "../outside", "", "a\0b"] {
        let b = [bad.as_bytes()];
        let r = h.call(&Tmessage::Walk {
            fid: ROOT,
            newfid: 13,
            names: WalkNames::new(&b).unwrap(),
        });
        assert_eq!(r.unwrap_err(), libc::EINVAL, "{bad:?}");
    }
    // Creating through a symlinked directory fails (the link is not a directory fid).
    h.walk_to(14, "abs_out").unwrap();
    assert_eq!(h.lcreate(14, b"x", 2, 0o600, 0).unwrap_err(), libc::ENOTDIR);
    assert_eq!(h.mkdir(14, b"x", 0o700, 0).unwrap_err(), libc::ENOTDIR);
    // lcreate never opens an existing symlink's target.
    h.walk_to(15, "").unwrap();
    assert_eq!(
        h.lcreate(15, b"secret_link", 2, 0o600, 0).unwrap_err(),
        libc::EEXIST
    );
    // setattr on a symlink does not touch the target.
    h.walk_to(16, "secret_link").unwrap();
    let sa = SetAttr {
        valid: setattr::SIZE,
        size: 0,
        ..Default::default()
    };
    assert!(h.setattr(16, sa).is_err());
    let sa = SetAttr {
        valid: setattr::MODE,
        mode: 0o777,
        ..Default::default()
    };
    assert!(h.setattr(16, sa).is_err());
    assert_eq!(
        std::fs::read(share.join("../outside/secret")).unwrap(),
        b"SECRET"
    );
    // Hard-linking a symlink links the link, not the secret.
    h.link(ROOT, 16, b"hard").unwrap();
    assert!(std::fs::symlink_metadata(share.join("hard"))
        .unwrap()
        .file_type()
        .is_symlink());
}

#[test]
fn special_files_are_never_opened() {
    let t = TempTree::new("special");
    let fifo = t.join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
    let _sock = std::os::unix::net::UnixListener::bind(t.join("sock")).unwrap();
    // A character device, when we may create one (root with CAP_MKNOD).
    let dev = std::ffi::CString::new(t.join("null").to_str().unwrap()).unwrap();
    // SAFETY: valid C string.
    let have_dev =
        unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) } == 0;
    let mut h = Harness::new(&t.path, Config::default());
    let mut names = vec!["fifo", "sock"];
    if have_dev {
        names.push("null");
    }
    for (i, n) in names.iter().enumerate() {
        let fid = 10 + i as u32;
        h.walk_to(fid, n).unwrap();
        // getattr works and reports the real type ...
        let a = h.getattr(fid).unwrap();
        assert!(
            matches!(
                a.mode & libc::S_IFMT,
                libc::S_IFIFO | libc::S_IFSOCK | libc::S_IFCHR
            ),
            "{n}"
        );
        // ... but opening is refused (a FIFO open would otherwise block this test forever).
        for flags in [libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR] {
            assert_eq!(h.lopen(fid, flags as u32).unwrap_err(), libc::EPERM, "{n}");
        }
        let sa = SetAttr {
            valid: setattr::SIZE,
            ..Default::default()
        };
        assert_eq!(h.setattr(fid, sa).unwrap_err(), libc::EINVAL, "{n}");
    }
    // lcreate over an existing FIFO never opens it.
    h.walk_to(20, "").unwrap();
    assert_eq!(
        h.lcreate(20, b"fifo", 0, 0o600, 0).unwrap_err(),
        libc::EEXIST
    );
}

#[test]
fn read_only_share_refuses_every_mutation() {
    let t = TempTree::new("ro");
    t.file("f", b"keep");
    t.file("d/x", b"");
    let mut h = Harness::new(
        &t.path,
        Config {
            read_only: true,
            ..Config::default()
        },
    );
    h.walk_to(2, "f").unwrap();
    h.walk_to(3, "d").unwrap();
    let sa = SetAttr {
        valid: setattr::SIZE,
        ..Default::default()
    };
    let mutations: Vec<Tmessage<'_>> = vec![
        Tmessage::Lcreate {
            fid: 3,
            name: b"n",
            flags: 2,
            mode: 0o600,
            gid: 0,
        },
        Tmessage::Symlink {
            fid: 3,
            name: b"n",
            target: b"x",
            gid: 0,
        },
        Tmessage::Mknod {
            dfid: 3,
            name: b"n",
            mode: libc::S_IFREG | 0o600,
            major: 0,
            minor: 0,
            gid: 0,
        },
        Tmessage::Rename {
            fid: 2,
            dfid: 3,
            name: b"n",
        },
        Tmessage::Renameat {
            olddirfid: ROOT,
            oldname: b"f",
            newdirfid: 3,
            newname: b"n",
        },
        Tmessage::Unlinkat {
            dirfid: ROOT,
            name: b"f",
            flags: 0,
        },
        Tmessage::Mkdir {
            dfid: 3,
            name: b"n",
            mode: 0o700,
            gid: 0,
        },
        Tmessage::Link {
            dfid: 3,
            fid: 2,
            name: b"n",
        },
        Tmessage::Setattr { fid: 2, attr: sa },
        Tmessage::Xattrcreate {
            fid: 2,
            name: b"user.a",
            size: 1,
            flags: 0,
        },
        Tmessage::Write {
            fid: 2,
            offset: 0,
            data: b"x",
        },
    ];
    for m in &mutations {
        assert_eq!(h.call(m).unwrap_err(), libc::EROFS, "{m:?}");
    }
    for flags in [
        libc::O_WRONLY,
        libc::O_RDWR,
        libc::O_RDONLY | libc::O_TRUNC,
        libc::O_RDONLY | libc::O_APPEND,
    ] {
        assert_eq!(
            h.lopen(2, flags as u32).unwrap_err(),
            libc::EROFS,
            "flags {flags:o}"
        );
    }
    // Tremove is refused (and clunks the fid).
    h.walk_to(4, "d/x").unwrap();
    assert_eq!(
        h.call(&Tmessage::Remove { fid: 4 }).unwrap_err(),
        libc::EROFS
    );
    // Reading still works.
    h.lopen(2, libc::O_RDONLY as u32).unwrap();
    assert_eq!(h.read(2, 0, 100).unwrap(), b"keep");
    assert_eq!(h.write(2, 0, b"x").unwrap_err(), libc::EROFS);
    assert_eq!(std::fs::read(t.join("f")).unwrap(), b"keep");
    assert!(t.join("d/x").exists());
    assert_eq!(std::fs::read_dir(t.join("d")).unwrap().count(), 1);
}

#[test]
fn fid_and_open_file_limits() {
    let t = TempTree::new("limits");
    t.file("f", b"x");
    let mut h = Harness::new(
        &t.path,
        Config {
            max_fids: 10,
            max_open_files: 3,
            ..Config::default()
        },
    );
    // The root fid is one of the ten.
    for fid in 2..=10 {
        h.walk(ROOT, fid, &["f"]).unwrap();
    }
    assert_eq!(h.walk(ROOT, 11, &["f"]).unwrap_err(), libc::ENFILE);
    assert_eq!(h.call(&anonymous_attach(11)).unwrap_err(), libc::ENFILE);
    h.clunk(10).unwrap();
    h.walk(ROOT, 11, &["f"]).unwrap();
    for fid in 2..=4 {
        h.lopen(fid, 0).unwrap();
    }
    assert_eq!(h.lopen(5, 0).unwrap_err(), libc::EMFILE);
    h.clunk(2).unwrap();
    h.lopen(5, 0).unwrap();
    assert_eq!(h.srv.session_usage(), (9, 3), "fid 2 was clunked");
    // Tversion drops everything.
    h.call(&Tmessage::Version {
        msize: 8192,
        version: b"9P2000.L",
    })
    .unwrap();
    assert_eq!(h.srv.session_usage(), (0, 0));
    // Each session has its own caps: see moving_tree.rs, sessions_have_their_own_caps.
}

fn lerror_of(reply: &[u8]) -> (u16, u32) {
    match Rmessage::decode(reply).unwrap() {
        (tag, Rmessage::Lerror { ecode }) => (tag, ecode),
        other => panic!("expected Rlerror, got {other:?}"),
    }
}

#[test]
fn malformed_messages_get_rlerror() {
    let t = TempTree::new("malformed");
    t.file("f", b"abc");
    let mut h = Harness::new(&t.path, Config::default());
    h.walk_to(2, "f").unwrap();
    h.lopen(2, 0).unwrap();
    // Unknown message types (including 9P2000 and 9P2000.u ones).
    for ty in [0u8, 6, 99, 106, 112, 114, 124, 126, 255] {
        let rep = h.raw(&[7, 0, 0, 0, ty, 0x34, 0x12]);
        assert_eq!(
            lerror_of(&rep),
            (0x1234, libc::EOPNOTSUPP as u32),
            "type {ty}"
        );
    }
    // Truncated bodies for every known type.
    for ty in [
        8u8, 12, 14, 16, 18, 20, 22, 24, 26, 30, 32, 40, 50, 52, 54, 70, 72, 74, 76, 100, 102, 104,
        108, 110, 116, 118, 120, 122,
    ] {
        let rep = h.raw(&[8, 0, 0, 0, ty, 9, 0, 1]);
        assert_eq!(lerror_of(&rep), (9, libc::EINVAL as u32), "type {ty}");
    }
    // Size field larger than the buffer, smaller than a header, or a buffer shorter than a header.
    assert_eq!(
        lerror_of(&h.raw(&[200, 0, 0, 0, msg::TCLUNK, 5, 0, 2, 0, 0, 0])).1,
        libc::EINVAL as u32
    );
    assert_eq!(
        lerror_of(&h.raw(&[2, 0, 0, 0, msg::TCLUNK, 5, 0, 2, 0, 0, 0])).1,
        libc::EINVAL as u32
    );
    assert_eq!(
        lerror_of(&h.raw(&[1, 2])),
        (wire::NOTAG, libc::EINVAL as u32)
    );
    assert_eq!(lerror_of(&h.raw(&[])), (wire::NOTAG, libc::EINVAL as u32));
    // Twrite whose count exceeds the data present.
    let mut b = Vec::new();
    Tmessage::Write {
        fid: 2,
        offset: 0,
        data: b"abcd",
    }
    .encode(3, &mut b);
    b[19..23].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(lerror_of(&h.raw(&b)), (3, libc::EINVAL as u32));
    // String length running past the end.
    let mut b = Vec::new();
    Tmessage::Walk {
        fid: ROOT,
        newfid: 9,
        names: WalkNames::new(&[b"f"]).unwrap(),
    }
    .encode(4, &mut b);
    let n = b.len();
    b[n - 3..n - 1].copy_from_slice(&u16::MAX.to_le_bytes());
    assert_eq!(lerror_of(&h.raw(&b)), (4, libc::EINVAL as u32));
    // Twalk with more than 16 names.
    let mut b = vec![0, 0, 0, 0, msg::TWALK, 5, 0];
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&17u16.to_le_bytes());
    for _ in 0..17 {
        b.extend_from_slice(&[1, 0, b'f']);
    }
    let n = b.len() as u32;
    b[..4].copy_from_slice(&n.to_le_bytes());
    assert_eq!(lerror_of(&h.raw(&b)), (5, libc::EINVAL as u32));
    // Huge read count is clamped, not trusted.
    assert_eq!(h.read(2, 0, u32::MAX).unwrap(), b"abc");
    // Unknown fids.
    assert_eq!(h.getattr(12345).unwrap_err(), libc::EBADF);
    assert_eq!(h.walk(wire::NOFID, 3, &[]).unwrap_err(), libc::EBADF);
    assert_eq!(
        h.call(&anonymous_attach(wire::NOFID)).unwrap_err(),
        libc::EBADF
    );
    // A reply area too small for the reply: Rlerror if it fits, otherwise nothing.
    let mut b = Vec::new();
    Tmessage::Getattr {
        fid: 2,
        mask: wire::GETATTR_ALL,
    }
    .encode(6, &mut b);
    let mut small = VecReply::new(20);
    let n = h.srv.handle(&b, &mut small);
    assert_eq!(lerror_of(&small.as_slice()[..n]), (6, libc::ENOBUFS as u32));
    let mut tiny = VecReply::new(5);
    assert_eq!(h.srv.handle(&b, &mut tiny), 0);
    // A read into a reply area smaller than msize is clamped to the area.
    let mut b = Vec::new();
    Tmessage::Read {
        fid: 2,
        offset: 0,
        count: 1000,
    }
    .encode(7, &mut b);
    let mut r = VecReply::new(13);
    let n = h.srv.handle(&b, &mut r);
    assert_eq!(
        Rmessage::decode(&r.as_slice()[..n]).unwrap(),
        (
            7,
            Rmessage::Read {
                data: b"ab"[..].into()
            }
        )
    );
    assert_eq!(r.capacity(), 13);
}

#[test]
fn many_threads_hammer_handle() {
    let t = TempTree::new("threads");
    for i in 0..64 {
        t.file(
            &format!("d{}/f{i}", i % 4),
            format!("content-{i}").as_bytes(),
        );
    }
    let h = Harness::new(&t.path, Config::default());
    let srv = h.srv.clone();
    let before = srv.session_usage();
    let threads: Vec<_> = (0..8u32)
        .map(|th| {
            let srv = Arc::clone(&srv);
            std::thread::spawn(move || {
                let mut r = VecReply::new(65536);
                let mut b = Vec::new();
                let mut call = |m: Tmessage<'_>| -> Rmessage<'static> {
                    b.clear();
                    m.encode(th as u16, &mut b);
                    let n = srv.handle(&b, &mut r);
                    let (tag, rep) = Rmessage::decode(&r.as_slice()[..n]).unwrap();
                    assert_eq!(tag, th as u16);
                    rep.into_owned()
                };
                for i in 0..500u32 {
                    let fid = 1000 + th * 100_000 + i;
                    let k = (i * 7 + th) % 64;
                    let d = format!("d{}", k % 4);
                    let f = format!("f{k}");
                    let names = [d.as_bytes(), f.as_bytes()];
                    let rep = call(Tmessage::Walk {
                        fid: ROOT,
                        newfid: fid,
                        names: WalkNames::new(&names).unwrap(),
                    });
                    assert!(
                        matches!(rep, Rmessage::Walk { ref qids } if qids.len() == 2),
                        "{rep:?}"
                    );
                    assert!(matches!(
                        call(Tmessage::Getattr {
                            fid,
                            mask: wire::GETATTR_BASIC
                        }),
                        Rmessage::Getattr(_)
                    ));
                    assert!(matches!(
                        call(Tmessage::Lopen { fid, flags: 0 }),
                        Rmessage::Lopen { .. }
                    ));
                    let rep = call(Tmessage::Read {
                        fid,
                        offset: 0,
                        count: 4096,
                    });
                    assert_eq!(
                        rep,
                        Rmessage::Read {
                            data: format!("content-{k}").into_bytes().into()
                        }
                    );
                    assert_eq!(call(Tmessage::Clunk { fid }), Rmessage::Clunk);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(srv.session_usage(), before);
    assert_eq!(srv.fid_count(), 1);
}
