//! Socket plumbing shared by the server and the client engine.
//!
//! * [`stream`]: the connection type every reader and writer takes (plain TCP or TLS).
//! * [`tls`]: certificates and the server's and client's TLS setup (rustls, ring).
//! * [`reader`]: a stream's read side cut into lines, and raw reads for file bodies.
//! * [`sendq`]: a connection's bounded send queue and the writer task that drains it.

mod reader;
mod sendq;
mod stream;
pub mod tls;

pub(crate) use reader::{LineReader, Spare};
pub(crate) use sendq::{advance, write_chunks, write_loop, write_with_progress, Pushed, SendQueue};
pub(crate) use stream::{Conn, ConnRead, ConnWrite};
