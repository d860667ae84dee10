//! The launcher's own failure: a message that says what to fix, and the exit status it ends
//! with. Every step of `run`, `boot` and `initrd` returns it.

use crate::EXIT_LAUNCHER;

/// A launcher failure: the message (which says what to fix) and the exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            code: EXIT_LAUNCHER,
            message: e.to_string(),
        }
    }
}

pub(crate) fn fail(message: impl Into<String>) -> Failure {
    Failure {
        code: EXIT_LAUNCHER,
        message: message.into(),
    }
}
