//! Waiting on the engine from a Python thread: the GIL is released, and the wait is cut into
//! slices of at most 50 ms with `check_signals()` between them, so Ctrl-C always works.

use std::future::Future;
use std::time::Duration;

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tokio::runtime::Runtime;

/// Longest stretch spent in Rust without looking for a pending signal.
const SLICE: Duration = Duration::from_millis(50);

/// The engine's tokio runtime (shared with asyncio through pyo3-async-runtimes).
pub(super) fn runtime() -> &'static Runtime {
    pyo3_async_runtimes::tokio::get_runtime()
}

/// Runs `fut` on the engine's runtime and waits for its result. If a signal handler raises
/// (KeyboardInterrupt), the future is cancelled and the exception propagates.
pub(super) fn block_on<T, F>(py: Python<'_>, fut: F) -> PyResult<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let rt = runtime();
    let mut task = rt.spawn(fut);
    loop {
        let slice =
            py.detach(|| rt.block_on(async { tokio::time::timeout(SLICE, &mut task).await }));
        match slice {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => return Err(PyRuntimeError::new_err(format!("engine task failed: {e}"))),
            Err(_) => {}
        }
        if let Err(e) = py.check_signals() {
            task.abort();
            return Err(e);
        }
    }
}

/// A timeout argument in seconds: `None` waits forever; negative or NaN is an error.
pub(super) fn seconds(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    timeout
        .map(|t| {
            Duration::try_from_secs_f64(t).map_err(|_| {
                pyo3::exceptions::PyValueError::new_err(format!("invalid timeout {t}"))
            })
        })
        .transpose()
}
