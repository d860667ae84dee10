//! Helpers shared by the appliance integration tests.

/// A scratch directory named after `tag`, under cargo's test temp dir, removed when dropped.
pub fn scratch(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("bootbox-{tag}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}
