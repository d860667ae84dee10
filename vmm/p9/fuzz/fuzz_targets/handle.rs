//! cargo-fuzz target: arbitrary bytes, split into requests by their size fields, fed to
//! `Server::handle` on a disposable share; every reply must be a well-formed answer to its
//! request and nothing outside the share may change.
//!
//! Run: `cd vmm/p9/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run handle -- -max_total_time=60`

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::cell::RefCell;

thread_local! {
    static TARGET: RefCell<Option<p9::fuzz::Target>> = const { RefCell::new(None) };
    static RUNS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fuzz_target!(|data: &[u8]| {
    TARGET.with(|t| {
        let mut t = t.borrow_mut();
        if t.is_none() {
            *t = Some(p9::fuzz::Target::new(false).expect("fuzz share setup"));
        }
        if let Some(target) = t.as_mut() {
            if let Err(e) = target.run_bytes(data) {
                panic!("{e}");
            }
            // Keep the tree small and the fids fresh every so often.
            let n = RUNS.with(|r| {
                r.set(r.get() + 1);
                r.get()
            });
            if n % 64 == 0 {
                let _ = target.reset();
            }
        }
    });
});
