//! `p9`: a fast, confined 9P2000.L file server, independent of any transport.
//!
//! * [`wire`]: message encoding/decoding.
//! * [`Server`]: one per exported directory; [`Server::handle`] turns one request into one reply
//!   and may be called from many threads at once.
//! * [`ReplyBuf`]/[`VecReply`]: where replies go (guest memory for virtio, a Vec otherwise).
//! * [`WorkerPool`]: runs requests concurrently; [`FlushTracker`]: the Tflush bookkeeping a
//!   transport running requests concurrently needs.
//! * [`socket`]: a unix/TCP stream transport (its readers poll adaptively, `busy_poll`);
//!   [`client`]: a small synchronous client used by tests and the `p9-bench` benchmark.

//!
//! ```
//! use p9::wire::{Rmessage, Tmessage, NOFID, NOTAG};
//! use p9::{Config, Server, VecReply};
//!
//! let dir = std::env::temp_dir();
//! let server = Server::new(&dir, Config { read_only: true, ..Config::default() }).unwrap();
//! let mut reply = VecReply::new(8192);
//! let mut req = Vec::new();
//! Tmessage::Version { msize: 8192, version: b"9P2000.L" }.encode(NOTAG, &mut req);
//! let n = server.handle(&req, &mut reply);
//! let (_, r) = Rmessage::decode(&reply.as_slice()[..n]).unwrap();
//! assert!(matches!(r, Rmessage::Version { msize: 8192, .. }));
//! req.clear();
//! Tmessage::Attach { fid: 1, afid: NOFID, uname: b"", aname: b"", n_uname: 0 }.encode(1, &mut req);
//! let n = server.handle(&req, &mut reply);
//! assert!(matches!(Rmessage::decode(&reply.as_slice()[..n]), Ok((1, Rmessage::Attach { .. }))));
//! ```

mod busy_poll;
pub mod client;
mod confine;
pub mod flush;
pub mod fuzz;
pub mod ownership;
pub mod pool;
pub mod reply;
pub mod server;
pub mod socket;
mod splice;
pub mod wire;

pub use flush::FlushTracker;
pub use ownership::Ownership;
pub use pool::{PoolStats, WorkerPool};
pub use reply::{ReplyBuf, VecReply};
pub use server::{histogram_quantile, raise_nofile_limit, Config, Error, Server, StatsSnapshot};

#[cfg(test)]
mod tests {
    #[test]
    fn server_is_send_and_sync_and_limits_follow_the_fd_limit() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<crate::Server>();
        send_sync::<crate::WorkerPool>();
        let soft = crate::raise_nofile_limit().unwrap();
        let c = crate::Config::default();
        assert!(c.max_fids as u64 <= soft.max(128));
        assert!(c.max_open_files <= c.max_fids);
        assert_eq!(c.msize, 512_000);
        assert!(!c.read_only);
    }
}
