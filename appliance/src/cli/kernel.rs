//! Finding the guest kernel: `--kernel`, else `$BOOTBOX_KERNEL`, else the newest kernel that
//! scripts/build-kernel.sh left in the cache.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("kernel {0} does not exist; build one with scripts/build-kernel.sh or pass --kernel")]
    Missing(PathBuf),
    #[error(
        "no guest kernel found (looked at $BOOTBOX_KERNEL and {0}); build one with \
         scripts/build-kernel.sh (needs apt-get install linux-source-6.12) or pass --kernel"
    )]
    NotBuilt(PathBuf),
    #[error(transparent)]
    Cache(#[from] appliance::ApplianceError),
}

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
    newest_cached(&dir).ok_or(KernelError::NotBuilt(dir))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_cached_kernel_and_ignores_incomplete_entries() {
        let dir = std::env::temp_dir().join(format!("bootbox-kernel-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
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
        assert_eq!(newest_cached(&dir), Some(dir.join("new").join("vmlinux")));
        assert_eq!(newest_cached(&dir.join("absent")), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_explicit_missing_kernel_is_an_error_that_says_what_to_do() {
        let err = find(Some(Path::new("/nonexistent/vmlinux"))).unwrap_err();
        assert!(err.to_string().contains("scripts/build-kernel.sh"), "{err}");
    }
}
