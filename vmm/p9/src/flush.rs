//! Tflush bookkeeping for transports that run requests concurrently: which tags are in flight,
//! and which flushes wait for each of them. 9P requires the Rflush to follow the flushed
//! request's reply, so a Tflush naming a request still running is parked here and handed back
//! when that request completes; a Tflush naming nothing in flight is answered at once.
//!
//! [`FlushTracker`] holds no lock of its own: each transport keeps it under the lock that also
//! orders its replies (the socket's connection state, the virtio device's tag table), so that
//! "take the waiting flushes" and "put the reply out" happen as one step.

use crate::wire;
use std::collections::HashMap;

/// In-flight tags and the flushes (`W`: whatever the transport needs to answer one later)
/// waiting for each.
#[derive(Debug)]
pub struct FlushTracker<W> {
    /// Per tag: requests running with it (a guest may reuse a tag before its reply) and the
    /// flushes waiting for the last of them.
    in_flight: HashMap<u16, (u32, Vec<W>)>,
}

impl<W> Default for FlushTracker<W> {
    fn default() -> Self {
        FlushTracker {
            in_flight: HashMap::new(),
        }
    }
}

impl<W> FlushTracker<W> {
    /// Nothing in flight.
    pub fn new() -> Self {
        Self::default()
    }

    /// A request with `tag` starts running.
    pub fn start(&mut self, tag: u16) {
        self.in_flight.entry(tag).or_insert((0, Vec::new())).0 += 1;
    }

    /// A Tflush of `oldtag` arrives. If a request with `oldtag` is running, `flush` waits for
    /// it (returned by [`FlushTracker::finish`]) and `None` comes back; otherwise `flush` comes
    /// back to be answered at once.
    pub fn flush(&mut self, oldtag: u16, flush: W) -> Option<W> {
        match self.in_flight.get_mut(&oldtag) {
            Some((_, waiting)) => {
                waiting.push(flush);
                None
            }
            None => Some(flush),
        }
    }

    /// A request with `tag` has completed and its reply is out (or is being put out under the
    /// same lock): returns the flushes to answer now, after it. They wait for the last request
    /// running with a reused tag. A tag not in flight returns nothing.
    pub fn finish(&mut self, tag: u16) -> Vec<W> {
        match self.in_flight.get_mut(&tag) {
            Some((running, _)) if *running > 1 => {
                *running -= 1;
                Vec::new()
            }
            Some(_) => self
                .in_flight
                .remove(&tag)
                .map(|(_, waiting)| waiting)
                .unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Whether a request with `tag` is running.
    pub fn is_in_flight(&self, tag: u16) -> bool {
        self.in_flight.contains_key(&tag)
    }

    /// Flushes waiting, over all tags.
    pub fn waiting(&self) -> usize {
        self.in_flight.values().map(|(_, w)| w.len()).sum()
    }
}

/// If `msg` (at least its first 9 bytes) is a Tflush, the tag it flushes: size[4] type[1]
/// tag[2] oldtag[2]. A Tflush too short to name one is not one here; the server refuses it.
pub fn flushed_tag(msg: &[u8]) -> Option<u16> {
    match msg {
        [_, _, _, _, ty, _, _, lo, hi, ..] if *ty == wire::msg::TFLUSH => {
            Some(u16::from_le_bytes([*lo, *hi]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Tmessage;

    #[test]
    fn a_flush_of_a_running_request_waits_for_it() {
        let mut t = FlushTracker::new();
        t.start(5);
        assert!(t.is_in_flight(5));
        assert_eq!(t.flush(5, "flush-a"), None);
        assert_eq!(t.flush(5, "flush-b"), None);
        assert_eq!(t.waiting(), 2);
        // Other tags are not held up.
        assert_eq!(t.finish(6), Vec::<&str>::new());
        assert_eq!(t.finish(5), ["flush-a", "flush-b"]);
        assert!(!t.is_in_flight(5));
        assert_eq!(t.waiting(), 0);
        // Finishing again (nothing in flight) returns nothing.
        assert_eq!(t.finish(5), Vec::<&str>::new());
    }

    #[test]
    fn a_flush_of_nothing_in_flight_is_answered_at_once() {
        let mut t = FlushTracker::new();
        assert_eq!(t.flush(9, 1u32), Some(1));
        t.start(9);
        t.finish(9);
        assert_eq!(
            t.flush(9, 2u32),
            Some(2),
            "a completed tag is no longer in flight"
        );
    }

    #[test]
    fn a_reused_tag_releases_its_flushes_after_the_last_request() {
        let mut t = FlushTracker::new();
        t.start(3);
        t.start(3);
        assert_eq!(t.flush(3, 'f'), None);
        assert_eq!(
            t.finish(3),
            Vec::<char>::new(),
            "one request with tag 3 still runs"
        );
        assert!(t.is_in_flight(3));
        assert_eq!(t.flush(3, 'g'), None);
        assert_eq!(t.finish(3), ['f', 'g']);
        assert!(!t.is_in_flight(3));
    }

    #[test]
    fn flushed_tag_reads_only_complete_tflush_headers() {
        let mut b = Vec::new();
        Tmessage::Flush { oldtag: 0x1234 }.encode(7, &mut b);
        assert_eq!(flushed_tag(&b), Some(0x1234));
        assert_eq!(flushed_tag(&b[..8]), None, "too short to name a tag");
        b.clear();
        Tmessage::Clunk { fid: 0x3412 }.encode(7, &mut b);
        assert_eq!(flushed_tag(&b), None, "not a Tflush");
        assert_eq!(flushed_tag(&[]), None);
    }
}
