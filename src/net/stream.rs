//! The connection stream type every reader and writer takes.
//!
//! A connection is plain TCP or TLS over TCP (see [`super::tls`]); nothing above this
//! module needs to know which. The plain halves are tokio's lock-free owned halves, so the
//! common case costs nothing over a bare `TcpStream`; a TLS stream is boxed (its state is
//! large) and split with `tokio::io::split`.
//!
//! A TLS write may leave encrypted bytes buffered when the socket is full: every writer
//! flushes at the end of what it has to say (a flush of plain TCP costs nothing).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::tls::TlsStream;

/// One accepted or opened connection, before it is split.
#[derive(Debug)]
pub(crate) enum Conn {
    /// Plain TCP (the lab's protocol).
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(TlsStream),
}

/// The read half of a [`Conn`].
#[derive(Debug)]
pub(crate) enum ConnRead {
    /// Plain TCP.
    Tcp(OwnedReadHalf),
    /// TLS.
    Tls(ReadHalf<TlsStream>),
}

/// The write half of a [`Conn`].
#[derive(Debug)]
pub(crate) enum ConnWrite {
    /// Plain TCP.
    Tcp(OwnedWriteHalf),
    /// TLS.
    Tls(WriteHalf<TlsStream>),
}

impl Conn {
    /// Wraps a TCP connection, with `TCP_NODELAY` on: every line is written whole and at
    /// once, so there is nothing for Nagle's algorithm to gain and a round trip to lose.
    pub(crate) fn tcp(stream: TcpStream) -> Self {
        let _ = stream.set_nodelay(true);
        Conn::Tcp(stream)
    }

    /// Splits into halves that a reader task and a writer task own separately.
    pub(crate) fn split(self) -> (ConnRead, ConnWrite) {
        match self {
            Conn::Tcp(s) => {
                let (rd, wr) = s.into_split();
                (ConnRead::Tcp(rd), ConnWrite::Tcp(wr))
            }
            Conn::Tls(s) => {
                let (rd, wr) = tokio::io::split(s);
                (ConnRead::Tls(rd), ConnWrite::Tls(wr))
            }
        }
    }

    /// Whether the peer is on this machine (a loopback address).
    pub(crate) fn peer_is_loopback(&self) -> bool {
        let peer = match self {
            Conn::Tcp(s) => s.peer_addr(),
            Conn::Tls(s) => s.get_ref().0.peer_addr(),
        };
        peer.is_ok_and(|a| a.ip().to_canonical().is_loopback())
    }

    /// Whether the connection is encrypted.
    pub(crate) fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

impl AsyncRead for ConnRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnRead::Tcp(rd) => Pin::new(rd).poll_read(cx, buf),
            ConnRead::Tls(rd) => Pin::new(rd).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ConnWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConnWrite::Tcp(wr) => Pin::new(wr).poll_write(cx, buf),
            ConnWrite::Tls(wr) => Pin::new(wr).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWrite::Tcp(wr) => Pin::new(wr).poll_flush(cx),
            ConnWrite::Tls(wr) => Pin::new(wr).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWrite::Tcp(wr) => Pin::new(wr).poll_shutdown(cx),
            ConnWrite::Tls(wr) => Pin::new(wr).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConnWrite::Tcp(wr) => Pin::new(wr).poll_write_vectored(cx, bufs),
            ConnWrite::Tls(wr) => Pin::new(wr).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ConnWrite::Tcp(wr) => wr.is_write_vectored(),
            ConnWrite::Tls(wr) => wr.is_write_vectored(),
        }
    }
}
