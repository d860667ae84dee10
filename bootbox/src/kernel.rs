//! Finding the guest kernel: `--kernel`, else `$BOOTBOX_KERNEL`, else the newest kernel that
//! scripts/build-kernel.sh left in the user's cache, else the newest one it installed for every
//! user (`--install`, under [`SYSTEM_KERNELS`]).

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel {0} does not exist; build one with scripts/build-kernel.sh or pass --kernel")]
    Missing(PathBuf),
    #[error(
        "no guest kernel found (looked at $BOOTBOX_KERNEL, {0} and {SYSTEM_KERNELS}); build one \
         with scripts/build-kernel.sh (needs apt-get install linux-source-6.12; add --install \
         as root to serve every user) or pass --kernel"
    )]
    NotBuilt(PathBuf),
    #[error(transparent)]
    Cache(#[from] appliance::ApplianceError),
}

/// Where `scripts/build-kernel.sh --install` puts kernels for every user of the machine.
pub const SYSTEM_KERNELS: &str = "/var/cache/bootbox/kernel";

/// The kernel to boot.
pub fn find(explicit: Option<&Path>) -> Result<PathBuf, KernelError> {
    let chosen = explicit.map(Path::to_path_buf).or_else(|| {
        std::env::var_os("BOOTBOX_KERNEL")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    });
    if let Some(p) = chosen {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(KernelError::Missing(p))
        };
    }
    let dir = appliance::default_cache_dir()?.join("kernel");
    first_found(&[&dir, Path::new(SYSTEM_KERNELS)]).ok_or(KernelError::NotBuilt(dir))
}

/// The newest kernel in the first of `dirs` that holds one.
fn first_found(dirs: &[&Path]) -> Option<PathBuf> {
    dirs.iter().find_map(|d| newest_cached(d))
}

/// The most recently built `<dir>/<key>/vmlinux`.
fn newest_cached(dir: &Path) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("vmlinux"))
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .max()
        .map(|(_, p)| p)
}

/// Whether `path` looks like something we can boot (used by `doctor`).
pub fn looks_like_kernel(path: &Path) -> bool {
    vmm::boot::loader::check_kernel_file(path).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_cached_kernel_and_ignores_incomplete_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        for (key, age) in [("old", 100), ("new", 10)] {
            std::fs::create_dir_all(dir.join(key)).unwrap();
            let f = dir.join(key).join("vmlinux");
            std::fs::write(&f, b"x").unwrap();
            let t = std::time::SystemTime::now() - std::time::Duration::from_secs(age);
            std::fs::File::options()
                .write(true)
                .open(&f)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        std::fs::create_dir_all(dir.join("build-incomplete")).unwrap();
        assert_eq!(newest_cached(dir), Some(dir.join("new").join("vmlinux")));
        assert_eq!(newest_cached(&dir.join("absent")), None);
    }

    #[test]
    fn the_users_cache_comes_before_the_system_wide_kernels() {
        let base = tempfile::tempdir().unwrap();
        let (user, system) = (base.path().join("user"), base.path().join("system"));
        std::fs::create_dir_all(system.join("k1")).unwrap();
        std::fs::write(system.join("k1/vmlinux"), b"x").unwrap();
        assert_eq!(
            first_found(&[&user, &system]),
            Some(system.join("k1/vmlinux")),
            "with no user cache the system-wide kernel is used"
        );
        std::fs::create_dir_all(user.join("k2")).unwrap();
        std::fs::write(user.join("k2/vmlinux"), b"x").unwrap();
        assert_eq!(
            first_found(&[&user, &system]),
            Some(user.join("k2/vmlinux"))
        );
    }

    #[test]
    fn an_explicit_missing_kernel_is_an_error_that_says_what_to_do() {
        let err = find(Some(Path::new("/nonexistent/vmlinux"))).unwrap_err();
        assert!(err.to_string().contains("scripts/build-kernel.sh"), "{err}");
    }

    #[test]
    fn recognises_kernels_by_their_headers() {
        assert!(!looks_like_kernel(Path::new("/etc/passwd")));
        assert!(!looks_like_kernel(Path::new("/nonexistent")));
        let exe = std::env::current_exe().unwrap();
        assert!(looks_like_kernel(&exe)); // an ELF file
    }
}
