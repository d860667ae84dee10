//! `p9`: a fast, confined 9P2000.L file server, independent of any transport.
//!
//! * [`wire`]: message encoding/decoding.
//! * [`Server`]: one per exported directory; [`Server::handle`] turns one request into one reply
//!   and may be called from many threads at once.
//! * [`ReplyBuf`]/[`VecReply`]: where replies go (guest memory for virtio, a Vec otherwise).
//! * [`WorkerPool`]: runs requests concurrently.
//! * [`socket`]: a unix/TCP stream transport; [`client`]: a small synchronous client used by
//!   tests and the `p9-bench` benchmark.

pub mod client;
pub mod fuzz;
pub mod pool;
pub mod reply;
pub mod server;
pub mod socket;
pub mod wire;

pub use pool::WorkerPool;
pub use reply::{ReplyBuf, VecReply};
pub use server::{Config, Error, Server, StatsSnapshot};
