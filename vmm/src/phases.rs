//! A cheap, thread-safe log of when things happened, in nanoseconds since process start: host
//! phases (VM created, kernel loaded, first KVM_RUN, ...) and guest phases reported through the
//! phase port. Timestamps come from `Instant` (CLOCK_MONOTONIC).

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One recorded phase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhaseEvent {
    pub name: Cow<'static, str>,
    /// Nanoseconds since the process start given to [`PhaseLog::new`].
    pub nanos: u64,
    /// Reported by the guest through the phase port.
    pub guest: bool,
}

/// Well-known guest phase ids written to the phase port (defined with the init in `guest_abi`).
pub use guest_abi::{
    PHASE_INIT_STARTED as GUEST_PHASE_INIT_STARTED, PHASE_JOB_FINISHED as GUEST_PHASE_JOB_FINISHED,
    PHASE_JOB_STARTED as GUEST_PHASE_JOB_STARTED,
    PHASE_SHARES_MOUNTED as GUEST_PHASE_SHARES_MOUNTED,
};

/// The name of guest phase `id`.
pub fn guest_phase_name(id: u8) -> Cow<'static, str> {
    match id {
        GUEST_PHASE_INIT_STARTED => "init started".into(),
        GUEST_PHASE_SHARES_MOUNTED => "shares mounted".into(),
        GUEST_PHASE_JOB_STARTED => "job started".into(),
        GUEST_PHASE_JOB_FINISHED => "job finished".into(),
        guest_abi::warm::PHASE_JOB_RECEIVED => "job received".into(),
        n => format!("guest phase {n}").into(),
    }
}

struct Inner {
    start: Instant,
    events: Mutex<Vec<PhaseEvent>>,
}

/// Shared phase log; clones record into the same log.
#[derive(Clone)]
pub struct PhaseLog(Arc<Inner>);

impl PhaseLog {
    /// A log whose time zero is `process_start`.
    pub fn new(process_start: Instant) -> Self {
        PhaseLog(Arc::new(Inner {
            start: process_start,
            events: Mutex::new(Vec::with_capacity(32)),
        }))
    }

    fn push(&self, name: Cow<'static, str>, guest: bool) {
        if let Ok(mut v) = self.0.events.lock() {
            // Timestamp under the lock, so the log is in time order across threads.
            let nanos = self.0.start.elapsed().as_nanos() as u64;
            crate::internal_check!(
                v.last().is_none_or(|last| last.nanos <= nanos),
                "phase {name} recorded before the previous one"
            );
            v.push(PhaseEvent { name, nanos, guest });
        }
    }

    /// Records host phase `name` now.
    pub fn record(&self, name: &'static str) {
        self.push(name.into(), false);
    }

    /// Records guest phase `id` now.
    pub fn record_guest(&self, id: u8) {
        self.push(guest_phase_name(id), true);
    }

    /// All phases so far, in the order they were recorded.
    pub fn events(&self) -> Vec<PhaseEvent> {
        self.0.events.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Nanoseconds of the first phase called `name`.
    pub fn get(&self, name: &str) -> Option<u64> {
        self.0
            .events
            .lock()
            .ok()?
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.nanos)
    }

    /// The process start this log measures from.
    pub fn start(&self) -> Instant {
        self.0.start
    }
}

impl std::fmt::Debug for PhaseLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.events()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_order_with_names() {
        let log = PhaseLog::new(Instant::now());
        log.record("kvm vm created");
        log.record_guest(1);
        log.record_guest(4);
        log.record_guest(9);
        let e = log.events();
        let names: Vec<_> = e.iter().map(|e| e.name.as_ref()).collect();
        assert_eq!(
            names,
            [
                "kvm vm created",
                "init started",
                "job finished",
                "guest phase 9"
            ]
        );
        assert_eq!(
            e.iter().map(|e| e.guest).collect::<Vec<_>>(),
            [false, true, true, true]
        );
        assert!(e.windows(2).all(|w| w[0].nanos <= w[1].nanos));
        assert_eq!(log.get("init started"), Some(e[1].nanos));
        assert_eq!(log.get("nope"), None);
    }
}
