//! PyO3 bindings: the crate as `relaychat._native`. Thin classes over [`crate::server`] and
//! [`crate::client`]; no protocol or state lives here.

mod accounts;
mod client;
mod errors;
mod events;
mod hooks;
mod server;
mod wait;

use pyo3::prelude::*;

/// Sends the engine's log lines (the lab's `[NEW CONNECTION]`, `[DISCONNECTED]`,
/// `[FILE RECEIVED]`, `[FILE ERROR]`, ...) to standard output. Call once; later calls do
/// nothing.
#[pyfunction]
#[pyo3(signature = (level = "info"))]
fn init_logging(level: &str) -> PyResult<()> {
    let level: tracing::Level = level.parse().map_err(|_| {
        pyo3::exceptions::PyValueError::new_err(format!("unknown log level {level:?}"))
    })?;
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stdout)
        .with_max_level(level)
        .without_time()
        .with_target(false)
        .with_level(false)
        .with_ansi(false)
        .try_init();
    Ok(())
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(init_logging, m)?)?;
    errors::register(m)?;
    events::register(m)?;
    server::register(m)?;
    client::register(m)?;
    accounts::register(m)?;
    hooks::register(m)?;
    Ok(())
}
