//! relaychat: a multi-user chat and file relay, wire-compatible with the socket lab it grew
//! from (`docs/PROTOCOL.md`).
//!
//! Module map:
//! * [`protocol`]: bytes in, values out. Framing, commands, server lines, file headers,
//!   name rules. Pure: no I/O, no runtime, no Python.
//! * [`server`]: the two listeners, the session registry, the chat handler and the file
//!   relay, with graceful shutdown.
//! * [`client`]: the client engine: both sockets, typed events, atomic file receive.
//! * [`store`]: what the server keeps beyond a connection, behind the `Store` trait.
//! * `net`: the connection stream type (plain or TLS), the line reader and the send queue;
//!   [`tls`] is its public part (certificates, fingerprints, how a client trusts a server).
//! * `transfer`: moving file bytes (write-then-rename, the body loop), for both sides.
//! * `flow`: how a connection task's step ends (refused, or the connection is over).
//! * `python` (feature `python`): the PyO3 bindings that make this crate
//!   `relaychat._native`.

pub mod client;
pub mod compress;
#[cfg(test)]
mod e2e_tests;
mod flow;
mod net;
pub mod protocol;
pub use net::tls;
pub mod server;
pub mod store;
mod transfer;

#[cfg(feature = "python")]
mod python;

/// Everything that can go wrong in the engine, as one typed enum.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The server refused a request with an `ERROR: ...` line, or closed the connection
    /// during the handshake.
    #[error("server refused: {0}")]
    Refused(String),
    /// The peer sent something that breaks the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An argument the protocol cannot carry (a newline in a message, a bad name, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// The connection is closed.
    #[error("connection closed")]
    Closed,
    /// A wait ran out of time.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The store could not be opened or used.
    #[error("{0}")]
    Store(String),
    /// TLS could not be set up, or the peer's certificate is not trusted (the text says
    /// which: wrong host name, unknown issuer, expired, pin mismatch, a changed
    /// certificate, a server that speaks no TLS).
    #[error("TLS: {0}")]
    Tls(String),
    /// The name is registered and no password was given.
    #[error("'{0}' is registered on this server: a password is needed")]
    PasswordRequired(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
