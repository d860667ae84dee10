//! `--share DIR[:TAG][:ro|rw]`: one grammar, one default and one tag rule for `run`, `boot` and
//! `initrd`. Clap calls [`parse_share`] once per argument; the directory is opened there, once
//! (`O_PATH | O_DIRECTORY | O_CLOEXEC`), and that descriptor is what the overlap check
//! inspects and what the 9p server serves, so a path renamed after the check cannot swap in
//! another directory.
//!
//! Grammar: fields are separated by `:`. A last field `ro` or `rw` is the mode (read-only
//! unless `rw`); one more field after DIR is the tag (default: the directory's name made to
//! fit the tag rule). A `:` inside DIR is written `\:`, and a `\` right before a `:` that ends
//! DIR as `\\`; every other `\` is an ordinary character. The tag rule is
//! [`guest_abi::check_share_tag`], the one the guest init applies too.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use guest_abi::{check_share_tag, is_share_tag_byte, BadShareTag, MAX_SHARE_TAG_LEN};

// Every tag the rule allows fits the monitor's virtio-9p device (checked when building).
const _: () = assert!(MAX_SHARE_TAG_LEN <= vmm::devices::virtio::fs9p::MAX_TAG_LEN);

/// The value name clap shows for `--share`.
pub const SHARE_GRAMMAR: &str = "DIR[:TAG][:ro|rw]";

/// One host directory shared with the guest, opened and checked.
#[derive(Debug, Clone)]
pub struct Share {
    /// The directory, opened once with `O_PATH | O_DIRECTORY` (symlinks followed).
    pub root: Arc<OwnedFd>,
    /// Where the opened directory is (as the kernel names it): for messages and the sandbox.
    pub dir: PathBuf,
    /// The 9p mount tag.
    pub tag: String,
    /// Whether the tag was given (`DIR:TAG`) rather than taken from the directory's name.
    pub tag_given: bool,
    pub read_only: bool,
}

/// Why a `--share` argument is refused.
#[derive(Debug, thiserror::Error)]
pub enum ShareSpecError {
    #[error("expected {SHARE_GRAMMAR} (write a ':' in DIR as '\\:')")]
    Grammar,
    #[error("the directory is empty")]
    EmptyDir,
    #[error("{0} is not a directory")]
    NotADirectory(String),
    #[error("cannot use {dir}: {source}")]
    Open { dir: String, source: io::Error },
    #[error(transparent)]
    Tag(#[from] BadShareTag),
}

/// Why a set of shares cannot be used together.
#[derive(Debug, thiserror::Error)]
pub enum ShareSetError {
    #[error("two shares have the tag '{0}': give each share its own tag")]
    DuplicateTag(String),
}

/// Splits `spec` at each `:` that is not escaped, undoing the `\:` and `\\` escapes.
pub(crate) fn split_fields(spec: &[u8]) -> Vec<Vec<u8>> {
    let mut fields = vec![Vec::new()];
    let mut i = 0;
    while i < spec.len() {
        let field = fields.last_mut().expect("never empty");
        match (spec[i], spec.get(i + 1)) {
            (b'\\', Some(&next @ (b':' | b'\\'))) => {
                field.push(next);
                i += 2;
            }
            (b':', _) => {
                fields.push(Vec::new());
                i += 1;
            }
            (b, _) => {
                field.push(b);
                i += 1;
            }
        }
    }
    fields
}

/// The clap value parser of `--share`: parses, opens the directory and checks the tag.
pub fn parse_share(spec: &str) -> Result<Share, ShareSpecError> {
    let mut fields = split_fields(spec.as_bytes());
    let mut read_only = true;
    if fields.len() > 1 {
        match fields.last().map(Vec::as_slice) {
            Some(b"ro") => {
                fields.pop();
            }
            Some(b"rw") => {
                read_only = false;
                fields.pop();
            }
            _ => {}
        }
    }
    let (dir, tag) = match <[_; 2]>::try_from(fields) {
        Ok([dir, tag]) => (dir, Some(tag)),
        Err(fields) => match <[_; 1]>::try_from(fields) {
            Ok([dir]) => (dir, None),
            Err(_) => return Err(ShareSpecError::Grammar),
        },
    };
    if dir.is_empty() {
        return Err(ShareSpecError::EmptyDir);
    }
    let dir = PathBuf::from(OsString::from_vec(dir));
    let root = open_dir(&dir).map_err(|source| {
        let shown = dir.display().to_string();
        if source.raw_os_error() == Some(libc::ENOTDIR) {
            ShareSpecError::NotADirectory(shown)
        } else {
            ShareSpecError::Open { dir: shown, source }
        }
    })?;
    // The kernel's name for what was opened; the path as given if /proc cannot say.
    let dir = std::fs::read_link(format!("/proc/self/fd/{}", root.as_raw_fd())).unwrap_or(dir);
    let tag_given = tag.is_some();
    let tag = match tag {
        // Split at ASCII bytes, the fields of a `&str` are still UTF-8.
        Some(t) => String::from_utf8_lossy(&t).into_owned(),
        None => tag_from_name(&dir),
    };
    check_share_tag(&tag)?;
    Ok(Share {
        root: Arc::new(root),
        dir,
        tag,
        tag_given,
        read_only,
    })
}

/// Opens `dir` as `O_PATH | O_DIRECTORY | O_CLOEXEC`, following symlinks.
pub fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path; open only reads it.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A tag made from the directory's name: bytes the tag rule refuses become `_`, a leading
/// `.` too, cut to the longest tag; `root` for `/`.
fn tag_from_name(dir: &Path) -> String {
    let name = dir.file_name().map(OsStrExt::as_bytes).unwrap_or_default();
    let tag: String = name
        .iter()
        .take(MAX_SHARE_TAG_LEN)
        .enumerate()
        .map(|(i, &b)| match b {
            b'.' if i == 0 => '_',
            b if is_share_tag_byte(b) => char::from(b),
            _ => '_',
        })
        .collect();
    if tag.is_empty() {
        "root".to_string()
    } else {
        tag
    }
}

/// Makes tags taken from directory names unique (`tree`, `tree-2`, ...); two shares given the
/// same tag explicitly are an error.
pub fn dedupe_tags(shares: &mut [Share]) -> Result<(), ShareSetError> {
    let mut seen = std::collections::HashSet::new();
    for s in shares.iter().filter(|s| s.tag_given) {
        if !seen.insert(s.tag.clone()) {
            return Err(ShareSetError::DuplicateTag(s.tag.clone()));
        }
    }
    for s in shares.iter_mut().filter(|s| !s.tag_given) {
        let base = s.tag.clone();
        let mut n = 1;
        while !seen.insert(s.tag.clone()) {
            n += 1;
            let suffix = format!("-{n}");
            let keep = MAX_SHARE_TAG_LEN - suffix.len();
            s.tag = format!("{}{suffix}", &base[..base.len().min(keep)]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn specs_parse_with_one_default_and_modes() {
        let t = scratch();
        let d = t.path().display();
        let real = t.path().canonicalize().unwrap();
        let s = parse_share(&format!("{d}")).unwrap();
        assert!(s.read_only, "read-only unless :rw");
        assert_eq!(s.dir, real);
        assert!(!s.tag_given);
        let s = parse_share(&format!("{d}:data:rw")).unwrap();
        assert_eq!(
            (s.tag.as_str(), s.read_only, s.tag_given),
            ("data", false, true)
        );
        let s = parse_share(&format!("{d}:rw")).unwrap();
        assert!(!s.read_only);
        let s = parse_share(&format!("{d}:ro")).unwrap();
        assert!(s.read_only);
        let s = parse_share(&format!("{d}:tag1")).unwrap();
        assert_eq!((s.tag.as_str(), s.read_only), ("tag1", true));
    }

    #[test]
    fn the_opened_directory_is_the_one_named() {
        let t = scratch();
        let s = parse_share(&t.path().display().to_string()).unwrap();
        // The descriptor stays on the directory even when its path now names another one.
        let moved = t.path().with_extension("moved");
        std::fs::rename(t.path(), &moved).unwrap();
        std::fs::create_dir(t.path()).unwrap();
        let fd_target = std::fs::read_link(format!("/proc/self/fd/{}", s.root.as_raw_fd()));
        assert_eq!(fd_target.unwrap(), moved.canonicalize().unwrap());
        std::fs::remove_dir_all(&moved).unwrap();
    }

    #[test]
    fn a_colon_in_the_directory_is_written_with_a_backslash() {
        let t = scratch();
        let odd = t.path().join("a:b");
        std::fs::create_dir(&odd).unwrap();
        let escaped = format!("{}/a\\:b", t.path().display());
        let s = parse_share(&escaped).unwrap();
        assert_eq!(s.dir, odd.canonicalize().unwrap());
        assert_eq!(s.tag, "a_b");
        let s = parse_share(&format!("{escaped}:odd:rw")).unwrap();
        assert_eq!((s.tag.as_str(), s.read_only), ("odd", false));
        // A backslash before the separator is doubled; others are ordinary characters.
        let back = t.path().join("x\\");
        std::fs::create_dir(&back).unwrap();
        let s = parse_share(&format!("{}/x\\\\:t", t.path().display())).unwrap();
        assert_eq!(
            (s.dir.clone(), s.tag.as_str()),
            (back.canonicalize().unwrap(), "t")
        );
        let s = parse_share(&format!("{}/x\\", t.path().display())).unwrap();
        assert_eq!(s.dir, back.canonicalize().unwrap());
        // Unescaped, the colon splits the argument.
        let e = parse_share(&format!("{}/a:b", t.path().display())).unwrap_err();
        assert!(e.to_string().contains("cannot use"), "{e}");
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        let e = parse_share("/nonexistent/dir").unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir"), "{e}");
        let e = parse_share("/etc/passwd").unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let e = parse_share("/tmp:bad tag").unwrap_err();
        assert!(e.to_string().contains("share tag \"bad tag\""), "{e}");
        let e = parse_share(&format!("/tmp:{}", "t".repeat(37))).unwrap_err();
        assert!(e.to_string().contains("1 to 36"), "{e}");
        let e = parse_share("/tmp:a:b:c").unwrap_err();
        assert!(e.to_string().contains("DIR[:TAG][:ro|rw]"), "{e}");
        assert!(matches!(parse_share(":tag"), Err(ShareSpecError::EmptyDir)));
    }

    #[test]
    fn tags_from_names_follow_the_tag_rule() {
        assert_eq!(tag_from_name(Path::new("/")), "root");
        assert_eq!(tag_from_name(Path::new("/x/.hidden")), "_hidden");
        assert_eq!(tag_from_name(Path::new("/x/my dir,ü")), "my_dir___");
        let long = tag_from_name(&Path::new("/x").join("n".repeat(80)));
        assert_eq!(long.len(), MAX_SHARE_TAG_LEN);
        for t in ["root", "_hidden", "my_dir___", &long] {
            check_share_tag(t).unwrap();
        }
    }

    #[test]
    fn derived_duplicate_tags_are_numbered_and_given_ones_must_differ() {
        let t = scratch();
        let mk = |tag: &str, tag_given: bool| Share {
            tag: tag.into(),
            tag_given,
            ..parse_share(&t.path().display().to_string()).unwrap()
        };
        let long = "l".repeat(MAX_SHARE_TAG_LEN);
        let mut v = vec![
            mk("tree", false),
            mk("tree", false),
            mk("other", true),
            mk("tree", false),
            mk(&long, false),
            mk(&long, false),
        ];
        dedupe_tags(&mut v).unwrap();
        let tags: Vec<_> = v.iter().map(|s| s.tag.as_str()).collect();
        let long2 = format!("{}-2", &long[..MAX_SHARE_TAG_LEN - 2]);
        assert_eq!(tags, ["tree", "tree-2", "other", "tree-3", &long, &long2]);
        // A derived tag never takes a given one.
        let mut v = vec![mk("tree", false), mk("tree", true)];
        dedupe_tags(&mut v).unwrap();
        assert_eq!((v[0].tag.as_str(), v[1].tag.as_str()), ("tree-2", "tree"));
        let mut v = vec![mk("same", true), mk("same", true)];
        let e = dedupe_tags(&mut v).unwrap_err();
        assert!(e.to_string().contains("'same'"), "{e}");
    }
}
