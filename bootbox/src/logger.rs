//! Where the `log::` messages of every layer (devices, the 9p server, this command) go: one
//! line each on stderr, `bootbox: LEVEL: message`. Quiet by default: warnings and errors only,
//! so a warning always reaches the user and a clean run prints nothing of its own. `-v` adds
//! info, `-vv` debug, `-vvv` trace; `BOOTBOX_LOG=off|error|warn|info|debug|trace` sets the
//! starting level (the flags only raise it). Hand-written: a stderr line is all bootbox needs,
//! and it costs no dependencies.

use std::io::Write;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// The environment variable that sets the level.
pub const LOG_ENV: &str = "BOOTBOX_LOG";

struct StderrLogger;

static LOGGER: StderrLogger = StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = match record.level() {
            Level::Error => format!("bootbox: error: {}\n", record.args()),
            Level::Warn => format!("bootbox: warning: {}\n", record.args()),
            Level::Info => format!("bootbox: {}\n", record.args()),
            // Debug and trace lines say which module spoke.
            level => format!(
                "bootbox: {}: [{}] {}\n",
                level.as_str().to_ascii_lowercase(),
                record.target(),
                record.args()
            ),
        };
        // One write per line, so lines from several threads do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// The level from `BOOTBOX_LOG` (`None` when unset) and the number of `-v` flags; `Err` names
/// a value that is not a level.
fn level(env: Option<&str>, verbose: u8) -> Result<LevelFilter, String> {
    let base = match env.map(str::trim) {
        None | Some("") => LevelFilter::Warn,
        Some(v) => v.parse::<LevelFilter>().map_err(|_| v.to_string())?,
    };
    let wanted = match verbose {
        0 => LevelFilter::Off,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    Ok(base.max(wanted))
}

/// Installs the logger (once, before any thread starts).
pub fn install(verbose: u8) {
    let env = std::env::var(LOG_ENV).ok();
    let (chosen, bad) = match level(env.as_deref(), verbose) {
        Ok(l) => (l, None),
        Err(bad) => (level(None, verbose).unwrap_or(LevelFilter::Warn), Some(bad)),
    };
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(chosen);
    }
    if let Some(bad) = bad {
        log::warn!(
            "{LOG_ENV}={bad} is not a level (off, error, warn, info, debug, trace); using {chosen}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_by_default_and_raised_by_flags_or_the_environment() {
        assert_eq!(level(None, 0), Ok(LevelFilter::Warn));
        assert_eq!(level(None, 1), Ok(LevelFilter::Info));
        assert_eq!(level(None, 2), Ok(LevelFilter::Debug));
        assert_eq!(level(None, 9), Ok(LevelFilter::Trace));
        assert_eq!(level(Some("debug"), 0), Ok(LevelFilter::Debug));
        assert_eq!(level(Some("DEBUG"), 0), Ok(LevelFilter::Debug));
        assert_eq!(level(Some("error"), 0), Ok(LevelFilter::Error));
        assert_eq!(level(Some("off"), 0), Ok(LevelFilter::Off));
        // Flags raise, never lower.
        assert_eq!(level(Some("trace"), 1), Ok(LevelFilter::Trace));
        assert_eq!(level(Some("error"), 2), Ok(LevelFilter::Debug));
        assert_eq!(level(Some("loud"), 0), Err("loud".into()));
        assert_eq!(level(Some(""), 0), Ok(LevelFilter::Warn));
    }
}
