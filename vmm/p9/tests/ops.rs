//! Every 9P2000.L operation against a temporary tree, through `Server::handle`.

mod common;

use common::*;
use p9::wire::{self, setattr, Lock, Rmessage, SetAttr, Tmessage, QTDIR, QTFILE, QTSYMLINK};
use p9::{Config, Server};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

#[test]
fn new_rejects_missing_or_non_directory_root() {
    let t = TempTree::new("badroot");
    let f = t.file("plain", b"x");
    let e = Server::new(&t.join("missing"), Config::default())
        .err()
        .unwrap();
    assert!(matches!(e, p9::Error::RootOpen { .. }), "{e}");
    let e = Server::new(&f, Config::default()).err().unwrap();
    assert!(matches!(e, p9::Error::RootNotDir(_)), "{e}");
}

#[test]
fn with_root_serves_the_directory_opened_not_what_its_path_names_later() {
    let t = TempTree::new("withroot");
    t.file("share/original", b"kept");
    let fd: std::os::fd::OwnedFd = std::fs::File::open(t.join("share")).unwrap().into();
    std::fs::rename(t.join("share"), t.join("moved")).unwrap();
    t.file("share/impostor", b"swapped in");
    let srv = Server::with_root(fd, &t.join("share"), Config::default()).unwrap();
    let mut h = Harness::attached(srv);
    assert!(h.walk_to(3, "original").is_ok());
    assert_eq!(h.walk_to(4, "impostor"), Err(libc::ENOENT));

    let file: std::os::fd::OwnedFd = std::fs::File::open(t.join("moved/original"))
        .unwrap()
        .into();
    let e = Server::with_root(file, &t.join("moved/original"), Config::default())
        .err()
        .unwrap();
    assert!(matches!(e, p9::Error::RootNotDir(_)), "{e}");
}

#[test]
fn version_negotiation() {
    let t = TempTree::new("version");
    let mut h = Harness::new(
        &t.path,
        Config {
            msize: 100_000,
            ..Config::default()
        },
    );
    match h
        .call(&Tmessage::Version {
            msize: 1_000_000,
            version: b"9P2000.L",
        })
        .unwrap()
    {
        Rmessage::Version { msize, version } => {
            assert_eq!(msize, 100_000);
            assert_eq!(*version, *b"9P2000.L");
        }
        r => panic!("{r:?}"),
    }
    // Version resets the session: the root fid is gone.
    assert_eq!(h.getattr(ROOT).unwrap_err(), libc::EBADF);
    match h
        .call(&Tmessage::Version {
            msize: 8192,
            version: b"9P2000.u",
        })
        .unwrap()
    {
        Rmessage::Version { version, .. } => assert_eq!(*version, *b"unknown"),
        r => panic!("{r:?}"),
    }
    assert_eq!(h.srv.msize(), 8192);
    // An msize too small to be useful is refused.
    assert_eq!(
        h.call(&Tmessage::Version {
            msize: 1000,
            version: b"9P2000.L"
        })
        .unwrap_err(),
        libc::EINVAL
    );
    // Auth is refused.
    assert!(h
        .call(&Tmessage::Auth {
            afid: 5,
            uname: b"u",
            aname: b"",
            n_uname: 0
        })
        .is_err());
}

#[test]
fn attach_walk_getattr_qids() {
    let t = TempTree::new("walk");
    let f = t.file("a/b/c.txt", b"hello");
    let mut h = Harness::new(&t.path, Config::default());
    let qids = h.walk(ROOT, 2, &["a", "b", "c.txt"]).unwrap();
    assert_eq!(qids.len(), 3);
    assert_eq!(qids[0].ty, QTDIR);
    assert_eq!(qids[2].ty, QTFILE);
    assert_eq!(qids[2].path, ino(&f));
    assert_ne!(qids[2].version, 0);
    let a = h.getattr(2).unwrap();
    assert_eq!(a.size, 5);
    assert_eq!(a.qid, qids[2]);
    assert_eq!(a.mode & libc::S_IFMT, libc::S_IFREG);
    assert_eq!(a.valid, wire::GETATTR_BASIC);
    // A partial walk returns the qids walked and does not create newfid.
    let q = h.walk(ROOT, 3, &["a", "nope", "x"]).unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(h.getattr(3).unwrap_err(), libc::EBADF);
    // First-name failure is an error.
    assert_eq!(h.walk(ROOT, 3, &["nope"]).unwrap_err(), libc::ENOENT);
    // Clone with zero names, then walk a fid onto itself.
    assert!(h.walk(ROOT, 4, &[]).unwrap().is_empty());
    h.walk(4, 4, &["a"]).unwrap();
    assert_eq!(h.getattr(4).unwrap().qid.path, ino(&t.join("a")));
    // newfid already in use.
    assert_eq!(h.walk(ROOT, 2, &["a"]).unwrap_err(), libc::EBADF);
    // `.` stays put.
    let q = h.walk(ROOT, 5, &["a", ".", "b"]).unwrap();
    assert_eq!(q[2].path, ino(&t.join("a/b")));
    h.clunk(2).unwrap();
    assert_eq!(h.clunk(2).unwrap_err(), libc::EBADF);
}

#[test]
fn open_read_write_create() {
    let t = TempTree::new("rw");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    t.file("big", &data);
    let mut h = Harness::new(&t.path, Config::default());
    h.walk_to(2, "big").unwrap();
    assert_eq!(
        h.read(2, 0, 10).unwrap_err(),
        libc::EBADF,
        "read before lopen"
    );
    h.lopen(2, libc::O_RDONLY as u32).unwrap();
    assert_eq!(h.lopen(2, 0).unwrap_err(), libc::EBADF, "second lopen");
    let d = h.read(2, 0, 1000).unwrap();
    assert_eq!(d, &data[..1000]);
    // Count larger than msize is clamped to msize - 11.
    let d = h.read(2, 100, u32::MAX).unwrap();
    assert_eq!(d.len(), 65536 - 11);
    assert_eq!(d, &data[100..100 + d.len()]);
    assert!(h.read(2, 1 << 40, 100).unwrap().is_empty());
    // Write to a read-only opened file fails.
    assert_eq!(h.write(2, 0, b"x").unwrap_err(), libc::EBADF);

    // lcreate turns the directory fid into the new, opened file.
    h.walk_to(3, "").unwrap();
    let q = match h
        .lcreate(3, b"new.txt", libc::O_RDWR as u32, 0o640, 0)
        .unwrap()
    {
        Rmessage::Lcreate { qid, .. } => qid,
        r => panic!("{r:?}"),
    };
    assert_eq!(q.path, ino(&t.join("new.txt")));
    match h.write(3, 0, b"written").unwrap() {
        Rmessage::Write { count } => assert_eq!(count, 7),
        r => panic!("{r:?}"),
    }
    assert_eq!(h.read(3, 0, 100).unwrap(), b"written");
    assert_eq!(std::fs::read(t.join("new.txt")).unwrap(), b"written");
    assert_eq!(
        std::fs::metadata(t.join("new.txt"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o640
    );
    h.call(&Tmessage::Fsync {
        fid: 3,
        datasync: 1,
    })
    .unwrap();
    h.call(&Tmessage::Fsync {
        fid: 3,
        datasync: 0,
    })
    .unwrap();
    // Creating an existing name fails.
    h.walk_to(4, "").unwrap();
    assert_eq!(
        h.lcreate(4, b"new.txt", 2, 0o600, 0).unwrap_err(),
        libc::EEXIST
    );
    // Bad names.
    for bad in [&b""[..], b".", b"..", b"a/b", b"a\0b"] {
        assert_eq!(
            h.lcreate(4, bad, 2, 0o600, 0).unwrap_err(),
            libc::EINVAL,
            "name {bad:?}"
        );
    }
    // Directories open read-only only, and cannot be read as files.
    h.walk_to(5, "").unwrap();
    assert_eq!(h.lopen(5, libc::O_RDWR as u32).unwrap_err(), libc::EISDIR);
    h.lopen(5, libc::O_RDONLY as u32).unwrap();
    assert_eq!(h.read(5, 0, 10).unwrap_err(), libc::EISDIR);
}

#[test]
fn readdir_lists_everything_without_duplicates() {
    let t = TempTree::new("readdir");
    for i in 0..1000 {
        t.file(&format!("d/file-{i:04}"), b"");
    }
    std::fs::create_dir(t.join("d/sub")).unwrap();
    std::os::unix::fs::symlink("file-0001", t.join("d/link")).unwrap();
    let mut h = Harness::new(&t.path, Config::default());
    h.walk_to(2, "d").unwrap();
    assert_eq!(
        h.call(&Tmessage::Readdir {
            fid: 2,
            offset: 0,
            count: 100
        })
        .unwrap_err(),
        libc::EBADF
    );
    h.lopen(2, 0).unwrap();
    // Small counts force many requests that resume at the returned offsets.
    let e = h.readdir_all(2, 300).unwrap();
    let mut names: Vec<String> = e
        .iter()
        .map(|e| String::from_utf8(e.name.clone()).unwrap())
        .collect();
    names.sort();
    let mut expect: Vec<String> = (0..1000).map(|i| format!("file-{i:04}")).collect();
    expect.extend([".".into(), "..".into(), "sub".into(), "link".into()]);
    expect.sort();
    assert_eq!(names, expect);
    for e in &e {
        let name = String::from_utf8(e.name.clone()).unwrap();
        if name == "sub" {
            assert_eq!(e.qid.ty, QTDIR);
            assert_eq!(e.ty, libc::DT_DIR);
            assert_eq!(e.qid.path, ino(&t.join("d/sub")));
        } else if name == "link" {
            assert_eq!(e.qid.ty, QTSYMLINK);
        } else if name.starts_with("file-") {
            assert_eq!(e.qid.path, ino(&t.join("d").join(&name)));
        }
    }
    // A count too small for one entry gives an empty reply.
    match h
        .call(&Tmessage::Readdir {
            fid: 2,
            offset: 0,
            count: 5,
        })
        .unwrap()
    {
        Rmessage::Readdir { data } => assert!(data.is_empty()),
        r => panic!("{r:?}"),
    }
    // At the root, `..` reports the root itself.
    h.walk_to(3, "").unwrap();
    h.lopen(3, 0).unwrap();
    let root = h.readdir_all(3, 8192).unwrap();
    let dotdot = root.iter().find(|e| e.name == b"..").unwrap();
    assert_eq!(dotdot.qid.path, ino(&t.path));
    // Not a directory.
    t.file("f", b"");
    h.walk_to(4, "f").unwrap();
    h.lopen(4, 0).unwrap();
    assert_eq!(
        h.call(&Tmessage::Readdir {
            fid: 4,
            offset: 0,
            count: 100
        })
        .unwrap_err(),
        libc::ENOTDIR
    );
}

/// Lists `dir` from a fresh fid (walk, lopen, readdir in small chunks, clunk) as sorted names.
fn listing(h: &mut Harness, fid: u32, dir: &str) -> Vec<String> {
    h.walk_to(fid, dir).unwrap();
    h.lopen(fid, 0).unwrap();
    let mut names: Vec<String> = h
        .readdir_all(fid, 400)
        .unwrap()
        .iter()
        .map(|e| String::from_utf8(e.name.clone()).unwrap())
        .collect();
    h.clunk(fid).unwrap();
    names.sort();
    names
}

fn host_listing(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .chain([".".to_string(), "..".to_string()])
        .collect();
    names.sort();
    names
}

#[test]
fn readdir_of_a_settled_directory_follows_host_changes() {
    let t = TempTree::new("readdir-settled");
    for i in 0..300 {
        t.file(&format!("d/file-{i:03}"), b"");
    }
    // Old enough for the server to keep its listing (see the server's directory cache).
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let mut h = Harness::new(&t.path, Config::default());
    let d = t.join("d");
    assert_eq!(listing(&mut h, 2, "d"), host_listing(&d));
    // The same listing again (kept), then after each kind of change on the host.
    assert_eq!(listing(&mut h, 2, "d"), host_listing(&d));
    let changes: [&dyn Fn(); 4] = [
        &|| drop(t.file("d/added", b"")),
        &|| std::fs::rename(d.join("added"), d.join("renamed")).unwrap(),
        &|| std::fs::remove_file(d.join("file-007")).unwrap(),
        &|| std::fs::create_dir(d.join("subdir")).unwrap(),
    ];
    for change in changes {
        change();
        assert_eq!(listing(&mut h, 2, "d"), host_listing(&d));
    }
    // Settled again: a kept listing read in small chunks (resuming at its cookies) is whole.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(listing(&mut h, 2, "d"), host_listing(&d));
    assert_eq!(listing(&mut h, 2, "d"), host_listing(&d));
}

#[test]
fn getattr_of_a_settled_file_follows_chown_and_host_attribute_changes() {
    let t = TempTree::new("getattr-settled");
    let f = t.file("f", b"data");
    // Old enough for the server to keep its view of the file (see the server's view cache).
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let mut h = Harness::new(&t.path, Config::default());
    h.walk_to(2, "f").unwrap();
    let host = std::fs::metadata(&f).unwrap();
    let a = h.getattr(2).unwrap();
    assert_eq!((a.uid, a.gid), (host.uid(), host.gid()));
    // Kept now; the guest's chown (recorded in the attribute) must show at once.
    assert_eq!(h.getattr(2).unwrap().uid, host.uid());
    h.setattr(
        2,
        SetAttr {
            valid: setattr::UID | setattr::GID,
            uid: 4321,
            gid: 8765,
            ..Default::default()
        },
    )
    .unwrap();
    let a = h.getattr(2).unwrap();
    assert_eq!((a.uid, a.gid), (4321, 8765));
    // Settled again and kept, then the host drops the attribute: the host's owner is back.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(h.getattr(2).unwrap().uid, 4321);
    assert_eq!(h.getattr(2).unwrap().uid, 4321);
    let c = std::ffi::CString::new(f.to_str().unwrap()).unwrap();
    // SAFETY: both strings are NUL-terminated.
    let r = unsafe { libc::removexattr(c.as_ptr(), c"user.bootbox.attr".as_ptr()) };
    assert_eq!(r, 0, "removexattr: {}", std::io::Error::last_os_error());
    let a = h.getattr(2).unwrap();
    assert_eq!((a.uid, a.gid), (host.uid(), host.gid()));
}

#[test]
fn namespace_operations() {
    let t = TempTree::new("ns");
    t.file("f", b"data");
    let mut h = Harness::new(&t.path, Config::default());
    // mkdir
    match h.mkdir(ROOT, b"dir", 0o750, 0).unwrap() {
        Rmessage::Mkdir { qid } => {
            assert_eq!(qid.ty, QTDIR);
            assert_eq!(qid.path, ino(&t.join("dir")));
        }
        r => panic!("{r:?}"),
    }
    assert!(t.join("dir").is_dir());
    assert_eq!(h.mkdir(ROOT, b"dir", 0o750, 0).unwrap_err(), libc::EEXIST);
    // symlink + readlink (the target text is stored, never followed)
    match h
        .call(&Tmessage::Symlink {
            fid: ROOT,
            name: b"sl",
            target: b"../../etc/passwd",
            gid: 0,
        })
        .unwrap()
    {
        Rmessage::Symlink { qid } => assert_eq!(qid.ty, QTSYMLINK),
        r => panic!("{r:?}"),
    }
    h.walk_to(2, "sl").unwrap();
    match h.call(&Tmessage::Readlink { fid: 2 }).unwrap() {
        Rmessage::Readlink { target } => assert_eq!(*target, *b"../../etc/passwd"),
        r => panic!("{r:?}"),
    }
    h.walk_to(3, "f").unwrap();
    assert_eq!(
        h.call(&Tmessage::Readlink { fid: 3 }).unwrap_err(),
        libc::EINVAL
    );
    // link
    h.link(ROOT, 3, b"f2").unwrap();
    assert_eq!(ino(&t.join("f2")), ino(&t.join("f")));
    h.walk_to(4, "dir").unwrap();
    assert_eq!(h.link(ROOT, 4, b"dir2").unwrap_err(), libc::EPERM);
    // link of a symlink links the symlink itself
    h.link(ROOT, 2, b"sl2").unwrap();
    assert_eq!(
        std::fs::read_link(t.join("sl2")).unwrap().to_str().unwrap(),
        "../../etc/passwd"
    );
    // renameat
    h.call(&Tmessage::Renameat {
        olddirfid: ROOT,
        oldname: b"f2",
        newdirfid: 4,
        newname: b"g",
    })
    .unwrap();
    assert!(t.join("dir/g").exists() && !t.join("f2").exists());
    // rename (by fid) follows the file wherever it is now
    h.walk_to(5, "dir/g").unwrap();
    h.call(&Tmessage::Rename {
        fid: 5,
        dfid: ROOT,
        name: b"h",
    })
    .unwrap();
    assert!(t.join("h").exists() && !t.join("dir/g").exists());
    h.call(&Tmessage::Rename {
        fid: 5,
        dfid: 4,
        name: b"h2",
    })
    .unwrap();
    assert!(t.join("dir/h2").exists());
    assert_eq!(
        h.call(&Tmessage::Rename {
            fid: ROOT,
            dfid: 4,
            name: b"x"
        })
        .unwrap_err(),
        libc::EBUSY
    );
    // mknod: FIFOs and regular files yes, devices no
    match h
        .call(&Tmessage::Mknod {
            dfid: ROOT,
            name: b"fifo",
            mode: libc::S_IFIFO | 0o644,
            major: 0,
            minor: 0,
            gid: 0,
        })
        .unwrap()
    {
        Rmessage::Mknod { qid } => assert_eq!(qid.path, ino(&t.join("fifo"))),
        r => panic!("{r:?}"),
    }
    // Device nodes never reach the host: in the default (mapped) ownership mode they are
    // regular-file stand-ins (see tests/ownership.rs).
    for dev in [libc::S_IFCHR, libc::S_IFBLK] {
        h.call(&Tmessage::Mknod {
            dfid: ROOT,
            name: b"dev",
            mode: dev | 0o666,
            major: 1,
            minor: 3,
            gid: 0,
        })
        .unwrap();
        assert!(std::fs::symlink_metadata(t.join("dev")).unwrap().is_file());
        std::fs::remove_file(t.join("dev")).unwrap();
    }
    // unlinkat: file, then directory with AT_REMOVEDIR
    h.call(&Tmessage::Unlinkat {
        dirfid: ROOT,
        name: b"f",
        flags: 0,
    })
    .unwrap();
    assert!(!t.join("f").exists());
    assert!(h
        .call(&Tmessage::Unlinkat {
            dirfid: ROOT,
            name: b"dir",
            flags: 0
        })
        .is_err());
    h.call(&Tmessage::Unlinkat {
        dirfid: 4,
        name: b"h2",
        flags: 0,
    })
    .unwrap();
    h.call(&Tmessage::Unlinkat {
        dirfid: ROOT,
        name: b"dir",
        flags: libc::AT_REMOVEDIR as u32,
    })
    .unwrap();
    assert!(!t.join("dir").exists());
    assert_eq!(
        h.call(&Tmessage::Unlinkat {
            dirfid: ROOT,
            name: b"..",
            flags: 0
        })
        .unwrap_err(),
        libc::EINVAL
    );
    // remove clunks the fid even when it fails
    h.walk_to(6, "fifo").unwrap();
    h.call(&Tmessage::Remove { fid: 6 }).unwrap();
    assert!(!t.join("fifo").exists());
    assert_eq!(h.getattr(6).unwrap_err(), libc::EBADF);
    h.walk_to(7, "").unwrap();
    assert_eq!(
        h.call(&Tmessage::Remove { fid: 7 }).unwrap_err(),
        libc::EBUSY
    );
    assert_eq!(h.getattr(7).unwrap_err(), libc::EBADF);
}

#[test]
fn setattr_statfs_locks_xattrs_flush() {
    let t = TempTree::new("attr");
    t.file("f", b"0123456789");
    let mut h = Harness::new(&t.path, Config::default());
    h.walk_to(2, "f").unwrap();
    let sa = SetAttr {
        valid: setattr::MODE
            | setattr::SIZE
            | setattr::ATIME
            | setattr::ATIME_SET
            | setattr::MTIME
            | setattr::MTIME_SET,
        mode: 0o600,
        size: 4,
        atime_sec: 1_000_000,
        mtime_sec: 2_000_000,
        mtime_nsec: 5,
        ..Default::default()
    };
    h.setattr(2, sa).unwrap();
    let m = std::fs::metadata(t.join("f")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o600);
    assert_eq!(m.len(), 4);
    assert_eq!(m.atime(), 1_000_000);
    assert_eq!(m.mtime(), 2_000_000);
    assert_eq!(m.mtime_nsec(), 5);
    // qid.version follows mtime
    let a = h.getattr(2).unwrap();
    assert_eq!(a.mtime_sec, 2_000_000);
    h.setattr(
        2,
        SetAttr {
            valid: setattr::MTIME,
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(h.getattr(2).unwrap().qid.version, a.qid.version);
    // uid/gid to our own ids works.
    let sa = SetAttr {
        valid: setattr::UID | setattr::GID,
        uid: m.uid(),
        gid: m.gid(),
        ..Default::default()
    };
    h.setattr(2, sa).unwrap();
    // size on a directory
    let sa = SetAttr {
        valid: setattr::SIZE,
        ..Default::default()
    };
    assert_eq!(h.setattr(ROOT, sa).unwrap_err(), libc::EISDIR);

    match h.call(&Tmessage::Statfs { fid: ROOT }).unwrap() {
        Rmessage::Statfs(s) => {
            assert!(s.bsize > 0 && s.blocks > 0 && s.namelen > 0);
        }
        r => panic!("{r:?}"),
    }
    let lock = Lock {
        ty: 1,
        flags: 0,
        start: 0,
        length: 10,
        proc_id: 42,
        client_id: b"guest",
    };
    assert_eq!(
        h.call(&Tmessage::Lock { fid: 2, lock }).unwrap(),
        Rmessage::Lock { status: 0 }
    );
    match h.call(&Tmessage::Getlock { fid: 2, lock }).unwrap() {
        Rmessage::Getlock {
            ty,
            start,
            length,
            proc_id,
            client_id,
        } => {
            assert_eq!(ty, libc::F_UNLCK as u8);
            assert_eq!((start, length, proc_id), (0, 10, 42));
            assert_eq!(*client_id, *b"guest");
        }
        r => panic!("{r:?}"),
    }
    assert_eq!(
        h.call(&Tmessage::Lock { fid: 99, lock }).unwrap_err(),
        libc::EBADF
    );
    assert_eq!(
        h.call(&Tmessage::Xattrwalk {
            fid: 2,
            newfid: 3,
            name: b"user.x"
        })
        .unwrap_err(),
        libc::ENODATA
    );
    assert_eq!(
        h.call(&Tmessage::Xattrwalk {
            fid: 2,
            newfid: 3,
            name: b""
        })
        .unwrap_err(),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        h.call(&Tmessage::Xattrcreate {
            fid: 2,
            name: b"user.x",
            size: 1,
            flags: 0
        })
        .unwrap_err(),
        libc::EOPNOTSUPP
    );
    assert_eq!(
        h.call(&Tmessage::Flush { oldtag: 3 }).unwrap(),
        Rmessage::Flush
    );
}

#[test]
fn stats_count_requests_when_enabled() {
    let t = TempTree::new("stats");
    t.file("f", b"x");
    let mut off = Harness::new(&t.path, Config::default());
    off.walk_to(2, "f").unwrap();
    off.getattr(2).unwrap();
    assert!(
        off.srv.stats().by_type.is_empty(),
        "statistics are off by default"
    );
    let config = Config {
        stats: true,
        ..Config::default()
    };
    // Tversion, Tattach and the walk are counted too: 3 requests before the getattrs.
    let mut h = Harness::new(&t.path, config);
    h.walk_to(2, "f").unwrap();
    for _ in 0..5 {
        h.getattr(2).unwrap();
    }
    assert!(h.getattr(77).is_err());
    h.clunk(2).unwrap();
    let s = h.srv.stats();
    assert!(s.by_type.contains(&(
        "getattr",
        6,
        s.by_type.iter().find(|e| e.0 == "getattr").unwrap().2
    )));
    assert_eq!(
        s.by_type.iter().find(|e| e.0 == "clunk").map(|e| e.1),
        Some(1)
    );
    assert_eq!(s.errors, 1);
    assert_eq!(s.histogram.iter().sum::<u64>(), 10);
    let per_type: u64 = s
        .type_histograms
        .iter()
        .map(|(_, h)| h.iter().sum::<u64>())
        .sum();
    assert_eq!(per_type, 10, "every request lands in its type's histogram");
    let getattr = &s
        .type_histograms
        .iter()
        .find(|(t, _)| *t == "getattr")
        .unwrap()
        .1;
    assert_eq!(getattr.iter().sum::<u64>(), 6);
    let p99 = p9::histogram_quantile(getattr, 0.99).unwrap();
    let p50 = p9::histogram_quantile(getattr, 0.5).unwrap();
    assert!(p50 <= p99 && p99.is_power_of_two());
    let text = s.to_string();
    assert!(text.contains("getattr") && text.contains("p95"), "{text}");
}

#[test]
fn histogram_quantiles_are_bucket_upper_bounds() {
    // 10 requests of 2-3 ns (bucket 2), 90 of 512-1023 ns (bucket 10).
    let mut h = vec![0u64; 40];
    h[2] = 10;
    h[10] = 90;
    assert_eq!(p9::histogram_quantile(&h, 0.05), Some(4));
    assert_eq!(p9::histogram_quantile(&h, 0.10), Some(4));
    assert_eq!(p9::histogram_quantile(&h, 0.11), Some(1024));
    assert_eq!(p9::histogram_quantile(&h, 0.99), Some(1024));
    assert_eq!(p9::histogram_quantile(&[0; 40], 0.5), None);
}
