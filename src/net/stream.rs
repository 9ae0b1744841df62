//! The connection stream type every reader and writer takes.
//!
//! Today a connection is plain TCP; TLS becomes one more variant of [`Conn`], [`ConnRead`]
//! and [`ConnWrite`], and nothing above this module changes. The plain halves are tokio's
//! lock-free owned halves, so the common case costs nothing over a bare `TcpStream`.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// One accepted or opened connection, before it is split.
#[derive(Debug)]
pub(crate) enum Conn {
    /// Plain TCP (the lab's protocol).
    Tcp(TcpStream),
}

/// The read half of a [`Conn`].
#[derive(Debug)]
pub(crate) enum ConnRead {
    /// Plain TCP.
    Tcp(OwnedReadHalf),
}

/// The write half of a [`Conn`].
#[derive(Debug)]
pub(crate) enum ConnWrite {
    /// Plain TCP.
    Tcp(OwnedWriteHalf),
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
        }
    }

    /// Writes `line` if the socket takes it at once, without waiting: how a connection that
    /// is refused before any handshake (server full, too many from one address) is told.
    pub(crate) fn try_tell(&self, line: &[u8]) {
        match self {
            Conn::Tcp(s) => {
                let _ = s.try_write(line);
            }
        }
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
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWrite::Tcp(wr) => Pin::new(wr).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ConnWrite::Tcp(wr) => Pin::new(wr).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ConnWrite::Tcp(wr) => Pin::new(wr).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ConnWrite::Tcp(wr) => wr.is_write_vectored(),
        }
    }
}
