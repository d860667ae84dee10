//! Refusing shares that overlap: one share inside another, or the same directory twice.
//!
//! Each share is served by its own 9p server confined to its directory. If one share's
//! directory holds another's, a guest can rename a directory out of the inner share through the
//! outer one while the inner share's server holds a fid in it, and then walk `..` from there to
//! anywhere on the host. So every pair of shares must be disjoint trees.
//!
//! Path strings cannot tell: symlinks, `..`, bind mounts and different spellings all name one
//! directory several ways. The check therefore works on what the kernel resolves:
//!
//! 1. Each share's directory, as opened once when `--share` was parsed (`O_PATH |
//!    O_DIRECTORY`, symlinks followed; the same descriptor the 9p server serves), gives its
//!    `(st_dev, st_ino)`, then `..` is opened again and again up to the root, collecting
//!    the `(st_dev, st_ino)` of every directory above it. Two shares overlap when one's
//!    identity is in the other's chain (the chain starts with the directory itself, so the same
//!    directory twice is caught too, whatever path or bind mount reaches it).
//! 2. `..` follows the mount tree, not the filesystem: from the root of a bind mount it goes to
//!    the mount point's parent. So a bind mount of a subdirectory of share A, mounted outside A
//!    and shared as B, is invisible to step 1: no directory above B is A. For that, each share
//!    is also located inside its filesystem using `/proc/self/mountinfo` (the mount's device and
//!    the part of the filesystem it shows, joined with the share's path below the mount point);
//!    two shares on the same device whose filesystem paths are equal or nested overlap.
//!
//! Limits, honestly: a tree reachable under two different devices (one NFS export mounted
//! twice as different superblocks, an overlay or FUSE view of a directory that is also shared
//! directly) is not recognised as the same tree, because nothing the kernel reports ties the two
//! together. When mountinfo cannot be read or does not describe the share's mount, only step 1
//! runs. And the check sees the host as it is when bootbox starts: mounts or renames made on
//! the host afterwards are the 9p server's confinement to handle.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use crate::share::Share;

/// `(st_dev, st_ino)`: what makes a directory the same directory whatever path reaches it.
type FileId = (u64, u64);

/// Walking `..` stops after this many levels even if no root was seen (a safety net only).
const MAX_DEPTH: usize = 4096;

/// What the kernel says about one share's directory.
#[derive(Debug)]
struct Located {
    /// The directory itself.
    id: FileId,
    /// The directory, its parent, and so on up to the root (reached with `..`).
    chain: Vec<FileId>,
    /// The device (`major:minor` as in mountinfo) and the path from that filesystem's root,
    /// when `/proc/self/mountinfo` describes the directory's mount.
    fs_path: Option<(String, PathBuf)>,
}

/// How two shares overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overlap {
    Same,
    /// The first share is inside the second.
    FirstInsideSecond,
    /// The second share is inside the first.
    SecondInsideFirst,
}

/// Why shares cannot be used together.
#[derive(Debug, thiserror::Error)]
pub enum OverlapError {
    #[error("--share {tag}: cannot inspect {dir}: {source}")]
    Inspect {
        tag: String,
        dir: PathBuf,
        source: io::Error,
    },
    #[error("{0}")]
    Overlap(String),
}

/// Refuses any two shares of which one is inside the other or both are the same directory,
/// as seen by the kernel (symlinks and bind mounts resolved).
pub fn refuse_overlaps(shares: &[Share]) -> Result<(), OverlapError> {
    if shares.len() < 2 {
        return Ok(());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let located = shares
        .iter()
        .map(|s| {
            locate(s.root.as_fd(), &mountinfo).map_err(|source| OverlapError::Inspect {
                tag: s.tag.clone(),
                dir: s.dir.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    for i in 0..shares.len() {
        for j in i + 1..shares.len() {
            if let Some(how) = overlap(&located[i], &located[j]) {
                return Err(OverlapError::Overlap(describe(&shares[i], &shares[j], how)));
            }
        }
    }
    Ok(())
}

fn describe(a: &Share, b: &Share, how: Overlap) -> String {
    const WHY: &str = "a guest could move a directory out of one share through the other and \
                       escape both; share the outer directory once, or directories that do not \
                       contain each other";
    let name = |s: &Share| format!("'{}' ({})", s.tag, s.dir.display());
    match how {
        Overlap::Same => format!(
            "shares {} and {} are the same directory (through a symlink or bind mount if the \
             paths differ): {WHY}",
            name(a),
            name(b)
        ),
        Overlap::FirstInsideSecond => {
            format!("shares overlap: {} is inside {}: {WHY}", name(a), name(b))
        }
        Overlap::SecondInsideFirst => {
            format!("shares overlap: {} is inside {}: {WHY}", name(b), name(a))
        }
    }
}

fn overlap(a: &Located, b: &Located) -> Option<Overlap> {
    if a.id == b.id {
        return Some(Overlap::Same);
    }
    if a.chain.contains(&b.id) {
        return Some(Overlap::FirstInsideSecond);
    }
    if b.chain.contains(&a.id) {
        return Some(Overlap::SecondInsideFirst);
    }
    let ((dev_a, path_a), (dev_b, path_b)) = (a.fs_path.as_ref()?, b.fs_path.as_ref()?);
    if dev_a != dev_b {
        return None;
    }
    if path_a == path_b {
        Some(Overlap::Same)
    } else if path_a.starts_with(path_b) {
        Some(Overlap::FirstInsideSecond)
    } else if path_b.starts_with(path_a) {
        Some(Overlap::SecondInsideFirst)
    } else {
        None
    }
}

/// Opens the parent (`..`) of the directory open at `dir`, as `O_PATH | O_DIRECTORY`.
fn open_parent(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: the path is a NUL-terminated literal and `dir` is open for the call; openat
    // only reads the path.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c"..".as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn file_id(fd: BorrowedFd<'_>) -> io::Result<FileId> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the call and `st` is a writable stat struct.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((st.st_dev, st.st_ino))
}

fn locate(dir: BorrowedFd<'_>, mountinfo: &str) -> io::Result<Located> {
    let id = file_id(dir)?;
    let fs_path = fs_path_of(dir, mountinfo);
    let mut chain = vec![id];
    // The parent of the last directory in the chain.
    let mut above = open_parent(dir)?;
    for _ in 0..MAX_DEPTH {
        let above_id = file_id(above.as_fd())?;
        if chain.last() == Some(&above_id) {
            break; // `..` of the root is the root
        }
        chain.push(above_id);
        above = open_parent(above.as_fd())?;
    }
    Ok(Located { id, chain, fs_path })
}

/// The device and path from the filesystem's root of the directory open at `fd`, from the
/// mount the descriptor is on (its `mnt_id`) and that mount's line in `mountinfo`.
fn fs_path_of(fd: BorrowedFd<'_>, mountinfo: &str) -> Option<(String, PathBuf)> {
    let raw = fd.as_raw_fd();
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{raw}")).ok()?;
    let mnt_id = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))?
        .trim()
        .to_string();
    let resolved = std::fs::read_link(format!("/proc/self/fd/{raw}")).ok()?;
    let mount = mountinfo
        .lines()
        .filter_map(parse_mount)
        .find(|m| m.id == mnt_id)?;
    filesystem_path(&mount, &resolved).map(|p| (mount.device, p))
}

/// The fields of one `/proc/self/mountinfo` line this check needs.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    id: String,
    device: String,
    /// The directory of the filesystem that the mount shows (`/` unless a bind mount).
    root: PathBuf,
    mount_point: PathBuf,
}

fn parse_mount(line: &str) -> Option<Mount> {
    let mut fields = line.split(' ');
    let id = fields.next()?.to_string();
    let _parent = fields.next()?;
    let device = fields.next()?.to_string();
    let root = PathBuf::from(unescape(fields.next()?));
    let mount_point = PathBuf::from(unescape(fields.next()?));
    Some(Mount {
        id,
        device,
        root,
        mount_point,
    })
}

/// mountinfo writes space, tab, newline and backslash in paths as `\ooo` octal escapes.
fn unescape(field: &str) -> std::ffi::OsString {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| {
            b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// Where `resolved` (an absolute path under `mount`'s mount point) lies inside the mount's
/// filesystem.
fn filesystem_path(mount: &Mount, resolved: &Path) -> Option<PathBuf> {
    let below = resolved.strip_prefix(&mount.mount_point).ok()?;
    if below.as_os_str().is_empty() {
        Some(mount.root.clone())
    } else {
        Some(mount.root.join(below))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::share::open_dir;
    use std::os::unix::fs::symlink;
    use std::sync::Arc;

    fn scratch(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("bootbox-shares-{name}-"))
            .tempdir()
            .unwrap()
    }

    /// A share of `dir` opened by the path exactly as given, with that path kept as its name
    /// (not canonicalized), so the check cannot lean on path strings cleaned up by the parser.
    fn share(dir: &Path, tag: &str) -> Share {
        Share {
            root: Arc::new(open_dir(dir).unwrap()),
            dir: dir.to_path_buf(),
            tag: tag.to_string(),
            tag_given: true,
            read_only: false,
        }
    }

    fn refused(shares: &[Share]) -> String {
        let e = refuse_overlaps(shares).expect_err("overlapping shares must be refused");
        e.to_string()
    }

    #[test]
    fn the_same_directory_twice_is_refused() {
        let t = scratch("same");
        let m = refused(&[share(t.path(), "a"), share(t.path(), "b")]);
        assert!(m.contains("same directory"), "{m}");
        assert!(m.contains("'a'") && m.contains("'b'"), "{m}");
        // Spelled differently: a trailing `.` and a `sub/..` detour.
        std::fs::create_dir(t.path().join("sub")).unwrap();
        let m = refused(&[
            share(&t.path().join("."), "a"),
            share(&t.path().join("sub/.."), "b"),
        ]);
        assert!(m.contains("same directory"), "{m}");
    }

    #[test]
    fn nested_shares_are_refused_in_either_order() {
        let t = scratch("nested");
        let inner = t.path().join("a/nest");
        std::fs::create_dir_all(&inner).unwrap();
        let outer = t.path().join("a");
        let m = refused(&[share(&outer, "a"), share(&inner, "b")]);
        assert!(m.contains("'b'") && m.contains("is inside 'a'"), "{m}");
        let m = refused(&[share(&inner, "b"), share(&outer, "a")]);
        assert!(m.contains("'b'") && m.contains("is inside 'a'"), "{m}");
        // Deeper nesting, with an unrelated share in between.
        let deep = t.path().join("a/nest/x/y");
        std::fs::create_dir_all(&deep).unwrap();
        let other = t.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let m = refused(&[share(&deep, "d"), share(&other, "o"), share(&outer, "a")]);
        assert!(m.contains("'d'") && m.contains("is inside 'a'"), "{m}");
    }

    #[test]
    fn a_symlink_to_a_nested_directory_is_refused() {
        let t = scratch("link");
        std::fs::create_dir_all(t.path().join("a/nest")).unwrap();
        // The link sits outside `a`, so its path string shares no prefix with `a`.
        let link = t.path().join("elsewhere");
        symlink(t.path().join("a/nest"), &link).unwrap();
        let m = refused(&[share(&t.path().join("a"), "a"), share(&link, "b")]);
        assert!(m.contains("'b'") && m.contains("is inside 'a'"), "{m}");
        // And the other way: a link to the outer directory, the inner one by its real path.
        let up = t.path().join("up");
        symlink(t.path().join("a"), &up).unwrap();
        let m = refused(&[share(&t.path().join("a/nest"), "n"), share(&up, "u")]);
        assert!(m.contains("'n'") && m.contains("is inside 'u'"), "{m}");
    }

    #[test]
    fn the_same_directory_through_a_symlinked_path_is_refused() {
        let t = scratch("samelink");
        std::fs::create_dir_all(t.path().join("real/dir")).unwrap();
        symlink(t.path().join("real"), t.path().join("alias")).unwrap();
        let m = refused(&[
            share(&t.path().join("real/dir"), "a"),
            share(&t.path().join("alias/dir"), "b"),
        ]);
        assert!(m.contains("same directory"), "{m}");
    }

    #[test]
    fn siblings_and_single_shares_are_allowed() {
        let t = scratch("siblings");
        for d in ["a", "b", "ab", "a-b/c"] {
            std::fs::create_dir_all(t.path().join(d)).unwrap();
        }
        // `ab` and `a-b` start with the same characters as `a` but are not inside it.
        let shares = [
            share(&t.path().join("a"), "a"),
            share(&t.path().join("b"), "b"),
            share(&t.path().join("ab"), "ab"),
            share(&t.path().join("a-b/c"), "c"),
        ];
        refuse_overlaps(&shares).unwrap();
        refuse_overlaps(&shares[..1]).unwrap();
        refuse_overlaps(&[]).unwrap();
    }

    #[test]
    fn the_check_inspects_the_opened_directories_not_their_paths() {
        let t = scratch("swap");
        std::fs::create_dir_all(t.path().join("a/nest")).unwrap();
        std::fs::create_dir(t.path().join("b")).unwrap();
        let a = share(&t.path().join("a"), "a");
        let b = share(&t.path().join("b"), "b");
        // After parsing, `b`'s path is made to name a directory inside `a`: what was opened
        // (a sibling of `a`) is what counts, and what the server will serve.
        std::fs::rename(t.path().join("b"), t.path().join("b-moved")).unwrap();
        symlink(t.path().join("a/nest"), t.path().join("b")).unwrap();
        refuse_overlaps(&[a.clone(), b]).unwrap();
        // Opened now, the same path is refused.
        let m = refused(&[a, share(&t.path().join("b"), "b")]);
        assert!(m.contains("is inside 'a'"), "{m}");
    }

    #[test]
    fn the_chain_reaches_the_root() {
        let t = scratch("chain");
        let l = locate(open_dir(t.path()).unwrap().as_fd(), "").unwrap();
        let root = file_id(open_dir(Path::new("/")).unwrap().as_fd()).unwrap();
        assert_eq!(l.chain.first(), Some(&l.id));
        assert_eq!(l.chain.last(), Some(&root));
        // One entry per component of the real path: the directory, each parent, and `/`.
        assert_eq!(
            l.chain.len(),
            t.path().canonicalize().unwrap().components().count()
        );
    }

    #[test]
    fn mountinfo_lines_locate_directories_inside_their_filesystem() {
        // A bind mount of /data/a/nest at /mnt/b: its root is /a/nest of the filesystem on 8:1
        // (mounted at /data), with an escaped space in the mount point.
        let bind =
            parse_mount("77 22 8:1 /a/nest /mnt/my\\040b rw,relatime shared:1 - ext4 /dev/sda1 rw")
                .unwrap();
        assert_eq!(
            bind,
            Mount {
                id: "77".into(),
                device: "8:1".into(),
                root: PathBuf::from("/a/nest"),
                mount_point: PathBuf::from("/mnt/my b"),
            }
        );
        let data = parse_mount("22 1 8:1 / /data rw - ext4 /dev/sda1 rw").unwrap();
        let b = filesystem_path(&bind, Path::new("/mnt/my b")).unwrap();
        let b_sub = filesystem_path(&bind, Path::new("/mnt/my b/x")).unwrap();
        let a = filesystem_path(&data, Path::new("/data/a")).unwrap();
        assert_eq!(b, PathBuf::from("/a/nest"));
        assert_eq!(b_sub, PathBuf::from("/a/nest/x"));
        assert_eq!(a, PathBuf::from("/a"));
        assert_eq!(filesystem_path(&data, Path::new("/elsewhere")), None);

        // Two shares whose `..` chains never meet, but whose filesystem paths nest.
        let located = |id, path: &PathBuf| Located {
            id,
            chain: vec![id, (1, 2)],
            fs_path: Some(("8:1".into(), path.clone())),
        };
        let (la, lb) = (located((8, 10), &a), located((8, 11), &b));
        assert_eq!(overlap(&la, &lb), Some(Overlap::SecondInsideFirst));
        assert_eq!(overlap(&lb, &la), Some(Overlap::FirstInsideSecond));
        let other_dev = Located {
            fs_path: Some(("8:2".into(), b.clone())),
            ..located((9, 11), &b)
        };
        assert_eq!(overlap(&la, &other_dev), None);
        let sibling = located((8, 12), &PathBuf::from("/ab"));
        assert_eq!(overlap(&la, &sibling), None, "/ab is not inside /a");
        assert_eq!(
            unescape("a\\134b\\011c\\9"),
            std::ffi::OsString::from("a\\b\tc\\9")
        );
    }

    #[test]
    fn mountinfo_of_this_process_locates_a_plain_directory() {
        let t = scratch("fspath");
        std::fs::create_dir(t.path().join("inner")).unwrap();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let at = |p: &Path, mountinfo: &str| locate(open_dir(p).unwrap().as_fd(), mountinfo);
        let outer = at(t.path(), &mountinfo).unwrap();
        let inner = at(&t.path().join("inner"), &mountinfo).unwrap();
        let (da, pa) = outer
            .fs_path
            .as_ref()
            .expect("mountinfo describes the temp directory");
        let (db, pb) = inner
            .fs_path
            .as_ref()
            .expect("mountinfo describes the temp directory");
        assert_eq!(da, db);
        assert_eq!(pb, &pa.join("inner"));
        // Even without mountinfo, step 1 alone sees the nesting.
        let bare = |p: &Path| Located {
            fs_path: None,
            ..at(p, "").unwrap()
        };
        assert_eq!(
            overlap(&bare(t.path()), &bare(&t.path().join("inner"))),
            Some(Overlap::SecondInsideFirst)
        );
    }
}
