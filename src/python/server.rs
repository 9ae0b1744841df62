//! `relaychat.Server`: the engine's server, started in the background.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio_util::sync::CancellationToken;

use super::wait::{block_on, runtime, seconds};
use crate::server::{Server, ServerConfig};

/// A running server's handles.
struct Running {
    chat_port: u16,
    file_port: u16,
    /// Cancel to shut the server down.
    stop: CancellationToken,
    /// Cancelled by the engine once shutdown has completed.
    finished: CancellationToken,
}

/// The relay server. `start()` runs it in the background; `serve_forever()` blocks until
/// Ctrl-C (or `stop()` from another thread).
#[pyclass(module = "relaychat._native", name = "Server", frozen)]
pub struct PyServer {
    config: ServerConfig,
    running: Mutex<Option<Running>>,
}

impl PyServer {
    fn running(&self) -> MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn finished(&self) -> Option<CancellationToken> {
        self.running().as_ref().map(|r| r.finished.clone())
    }
}

#[pymethods]
impl PyServer {
    #[new]
    #[pyo3(signature = (
        host = "127.0.0.1".to_owned(), chat_port = 2003, file_port = 2007,
        data_dir = PathBuf::from("."), *, idle_pause = None, max_line = None, max_header = None,
        send_queue = None, send_queue_bytes = None, send_timeout = None, handshake_timeout = None, transfer_timeout = None,
        max_connections = None, max_per_address = None, max_file_size = None, user_quota = None,
        min_free_disk = None,
    ))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        host: String,
        chat_port: u16,
        file_port: u16,
        data_dir: PathBuf,
        idle_pause: Option<f64>,
        max_line: Option<usize>,
        max_header: Option<usize>,
        send_queue: Option<usize>,
        send_queue_bytes: Option<usize>,
        send_timeout: Option<f64>,
        handshake_timeout: Option<f64>,
        transfer_timeout: Option<f64>,
        max_connections: Option<usize>,
        max_per_address: Option<usize>,
        max_file_size: Option<u64>,
        user_quota: Option<u64>,
        min_free_disk: Option<u64>,
    ) -> PyResult<Self> {
        let d = ServerConfig::default();
        let config = ServerConfig {
            host,
            chat_port,
            file_port,
            data_dir,
            idle_pause: seconds(idle_pause)?.unwrap_or(d.idle_pause),
            max_line: max_line.unwrap_or(d.max_line).max(1),
            max_header: max_header.unwrap_or(d.max_header).max(64),
            send_queue: send_queue.unwrap_or(d.send_queue).max(1),
            send_queue_bytes: send_queue_bytes.unwrap_or(d.send_queue_bytes).max(1),
            send_timeout: seconds(send_timeout)?.unwrap_or(d.send_timeout),
            handshake_timeout: seconds(handshake_timeout)?.unwrap_or(d.handshake_timeout),
            transfer_timeout: seconds(transfer_timeout)?.unwrap_or(d.transfer_timeout),
            max_connections: max_connections.unwrap_or(d.max_connections),
            max_per_address: max_per_address.unwrap_or(d.max_per_address),
            max_file_size: max_file_size.unwrap_or(d.max_file_size),
            user_quota: user_quota.unwrap_or(d.user_quota),
            min_free_disk: min_free_disk.unwrap_or(d.min_free_disk),
        };
        Ok(Self {
            config,
            running: Mutex::new(None),
        })
    }

    /// Binds both ports and starts serving in the background. Idempotent while running.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        if self.running().is_some() {
            return Ok(());
        }
        let server = block_on(py, Server::bind(self.config.clone()))??;
        let chat_port = server.chat_addr()?.port();
        let file_port = server.file_addr()?.port();
        let stop = CancellationToken::new();
        let finished = CancellationToken::new();
        let (stop2, finished2) = (stop.clone(), finished.clone());
        runtime().spawn(async move {
            server.run(stop2.cancelled_owned()).await;
            finished2.cancel();
        });
        *self.running() = Some(Running {
            chat_port,
            file_port,
            stop,
            finished,
        });
        Ok(())
    }

    /// Starts the server if needed and blocks until it stops. Ctrl-C shuts it down
    /// gracefully and then raises KeyboardInterrupt.
    fn serve_forever(&self, py: Python<'_>) -> PyResult<()> {
        self.start(py)?;
        let Some(finished) = self.finished() else {
            return Ok(());
        };
        match block_on(py, finished.cancelled_owned()) {
            Ok(()) => Ok(()),
            Err(interrupt) => {
                self.stop(py, 10.0)?;
                Err(interrupt)
            }
        }
    }

    /// Stops accepting, closes every connection (aborting transfers and removing their
    /// partial files) and waits up to `timeout` seconds for the engine to finish.
    #[pyo3(signature = (timeout = 10.0))]
    fn stop(&self, py: Python<'_>, timeout: f64) -> PyResult<()> {
        let limit = seconds(Some(timeout))?.unwrap_or(Duration::from_secs(10));
        let Some(running) = self.running().take() else {
            return Ok(());
        };
        running.stop.cancel();
        let finished = running.finished;
        let done = block_on(py, async move {
            tokio::time::timeout(limit, finished.cancelled_owned())
                .await
                .is_ok()
        })?;
        if !done {
            return Err(PyRuntimeError::new_err("the server did not stop in time"));
        }
        Ok(())
    }

    /// Whether the server is serving.
    #[getter]
    fn is_running(&self) -> bool {
        self.running()
            .as_ref()
            .is_some_and(|r| !r.finished.is_cancelled())
    }

    /// The chat port actually bound (the configured one before `start()`).
    #[getter]
    fn chat_port(&self) -> u16 {
        self.running()
            .as_ref()
            .map_or(self.config.chat_port, |r| r.chat_port)
    }

    /// The file port actually bound (the configured one before `start()`).
    #[getter]
    fn file_port(&self) -> u16 {
        self.running()
            .as_ref()
            .map_or(self.config.file_port, |r| r.file_port)
    }

    /// The address the server listens on.
    #[getter]
    fn host(&self) -> &str {
        &self.config.host
    }

    /// Where uploads are saved.
    #[getter]
    fn data_dir(&self) -> PathBuf {
        self.config.data_dir.clone()
    }

    fn __enter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, Self>> {
        slf.get().start(slf.py())?;
        Ok(slf)
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.stop(py, 10.0)?;
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!(
            "Server(host={:?}, chat_port={}, file_port={}, running={})",
            self.config.host,
            self.chat_port(),
            self.file_port(),
            self.is_running()
        )
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyServer>()
}
