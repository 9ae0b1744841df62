//! `relaychat.Server`: the engine's server, started in the background.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFloat, PyTuple};
use tokio_util::sync::CancellationToken;

use super::wait::{block_on, runtime, seconds};
use crate::protocol::server_line::one_line;
use crate::server::hooks::{CustomCommand, HookQueue, HookSpec, Hooks, Policy as HookPolicy};
use crate::server::metrics::Metrics;
use crate::server::{
    Control, Number, Policy, Server, ServerConfig, SettingError, TlsHandle, SETTINGS,
};
use crate::store::SqliteStore;
use crate::tls::TlsSource;

/// The database's name in the data directory when `db` is not given.
const DEFAULT_DB: &str = "relaychat.db";
use std::sync::Arc;

/// A setting's value from Python: an int, or a float (seconds); bools are refused.
fn number(name: &str, value: &Bound<'_, PyAny>) -> PyResult<Number> {
    if value.is_instance_of::<pyo3::types::PyBool>() {
        return Err(PyTypeError::new_err(format!("{name} must be a number")));
    }
    if let Ok(n) = value.extract::<u64>() {
        return Ok(Number::Int(n));
    }
    if value.is_instance_of::<PyFloat>() {
        return Ok(Number::Float(value.extract()?));
    }
    if value.extract::<i64>().is_ok() {
        return Err(PyValueError::new_err(format!("{name} may not be negative")));
    }
    Err(PyTypeError::new_err(format!("{name} must be a number")))
}

/// A running server's handles.
struct Running {
    chat_port: u16,
    file_port: u16,
    /// Cancel to shut the server down.
    stop: CancellationToken,
    /// Cancelled by the engine once shutdown has completed.
    finished: CancellationToken,
    /// Reloads the certificate.
    tls: TlsHandle,
    /// Who is there, messages as the server, kicks.
    control: Control,
    /// What it counts.
    metrics: Arc<Metrics>,
    /// Where Prometheus scrapes it.
    metrics_port: Option<u16>,
}

/// The relay server. `start()` runs it in the background; `serve_forever()` blocks until
/// Ctrl-C (or `stop()` from another thread).
#[pyclass(module = "relaychat._native", name = "Server", frozen, subclass)]
pub struct PyServer {
    config: ServerConfig,
    /// The SQLite database state is kept in (`:memory:`: in memory, forgotten at exit).
    db: PathBuf,
    running: Mutex<Option<Running>>,
    /// The hooks installed before `start()`, and the queue of their requests.
    hooks: Mutex<Option<InstalledHooks>>,
}

/// Hooks given to the engine, and where their requests wait for Python.
struct InstalledHooks {
    hooks: Arc<Hooks>,
    queue: Arc<tokio::sync::Mutex<HookQueue>>,
}

/// A hook kind's `(time limit in seconds, fail_open)` from Python.
fn policy(given: Option<(f64, bool)>) -> PyResult<Option<HookPolicy>> {
    given
        .map(|(limit, fail_open)| {
            let limit = seconds(Some(limit))?.unwrap_or(Duration::from_secs(1));
            Ok(HookPolicy { limit, fail_open })
        })
        .transpose()
}

impl PyServer {
    fn running(&self) -> MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn installed(&self) -> MutexGuard<'_, Option<InstalledHooks>> {
        self.hooks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn control(&self) -> PyResult<Control> {
        self.running()
            .as_ref()
            .map(|r| r.control.clone())
            .ok_or_else(|| PyRuntimeError::new_err("the server is not running"))
    }

    fn finished(&self) -> Option<CancellationToken> {
        self.running().as_ref().map(|r| r.finished.clone())
    }
}

#[pymethods]
impl PyServer {
    /// `Server(host, chat_port, file_port, data_dir, *, db, require_account, registration,
    /// history, tls_cert, tls_key, tls_self_signed, require_tls, allow_plaintext_login,
    /// **limits)`: every limit of `relaychat.SETTINGS` may be given by name (sizes and
    /// counts as ints, times in seconds). `require_account` turns guests away,
    /// `registration=False` closes `register`, `history=False` keeps no history.
    /// `tls_cert` and `tls_key` (PEM files) or `tls_self_signed` serve TLS on both ports
    /// beside plain text; `require_tls` refuses plain text; `allow_plaintext_login` takes
    /// passwords over plain text from other machines too.
    #[new]
    #[pyo3(signature = (
        host = "127.0.0.1".to_owned(), chat_port = 2003, file_port = 2007,
        data_dir = PathBuf::from("."), *, db = None, require_account = false,
        registration = true, history = true, tls_cert = None, tls_key = None,
        tls_self_signed = false, require_tls = false, allow_plaintext_login = false,
        metrics_port = None, **limits
    ), text_signature = "(host='127.0.0.1', chat_port=2003, file_port=2007, data_dir='.', *, db=None, require_account=False, registration=True, history=True, tls_cert=None, tls_key=None, tls_self_signed=False, require_tls=False, allow_plaintext_login=False, metrics_port=None, **limits)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        host: String,
        chat_port: u16,
        file_port: u16,
        data_dir: PathBuf,
        db: Option<PathBuf>,
        require_account: bool,
        registration: bool,
        history: bool,
        tls_cert: Option<PathBuf>,
        tls_key: Option<PathBuf>,
        tls_self_signed: bool,
        require_tls: bool,
        allow_plaintext_login: bool,
        metrics_port: Option<u16>,
        limits: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let tls = match (tls_cert, tls_key, tls_self_signed) {
            (Some(cert), Some(key), false) => Some(TlsSource::Files { cert, key }),
            (None, None, true) => Some(TlsSource::SelfSigned),
            (None, None, false) => None,
            (Some(_), None, _) | (None, Some(_), _) => {
                return Err(PyValueError::new_err("tls_cert and tls_key go together"))
            }
            (Some(_), Some(_), true) => {
                return Err(PyValueError::new_err(
                    "tls_self_signed or tls_cert and tls_key, not both",
                ))
            }
        };
        if require_tls && tls.is_none() {
            return Err(PyValueError::new_err(
                "require_tls needs a certificate (tls_cert and tls_key, or tls_self_signed)",
            ));
        }
        let mut config = ServerConfig {
            host,
            chat_port,
            file_port,
            data_dir,
            policy: Policy {
                require_account,
                registration,
                history,
                require_tls,
                allow_plaintext_login,
            },
            tls,
            metrics_port,
            ..ServerConfig::default()
        };
        let hooks = Mutex::new(None);
        for (key, value) in limits.into_iter().flat_map(|d| d.iter()) {
            let name: String = key.extract()?;
            if value.is_none() && SETTINGS.iter().any(|s| s.name == name) {
                continue; // None keeps the default
            }
            let number = number(&name, &value)?;
            config.limits.set(&name, number).map_err(|e| match e {
                SettingError::Unknown(_) => PyTypeError::new_err(format!(
                    "Server() got an unexpected keyword argument '{name}'"
                )),
                SettingError::Invalid { .. } => PyValueError::new_err(e.to_string()),
            })?;
        }
        let db = db.unwrap_or_else(|| config.data_dir.join(DEFAULT_DB));
        Ok(Self {
            config,
            db,
            running: Mutex::new(None),
            hooks,
        })
    }

    /// The limits in force, by name (times in seconds).
    #[getter]
    fn limits<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        for s in SETTINGS {
            match self.config.limits.get(s.name) {
                Some(Number::Int(n)) => dict.set_item(s.name, n)?,
                Some(Number::Float(f)) => dict.set_item(s.name, f)?,
                None => {}
            }
        }
        Ok(dict)
    }

    /// Binds both ports and starts serving in the background. Idempotent while running.
    fn start(&self, py: Python<'_>) -> PyResult<()> {
        if self.running().is_some() {
            return Ok(());
        }
        let mut config = self.config.clone();
        config.hooks = self.installed().as_ref().map(|h| h.hooks.clone());
        // Opening checks and migrates the database: off the GIL, before serving.
        let db = self.db.clone();
        let store = py
            .detach(|| SqliteStore::open(&db))
            .map_err(|e| crate::Error::Store(e.to_string()))?;
        config.store = Some(Arc::new(store));
        let server = block_on(py, Server::bind(config))??;
        let chat_port = server.chat_addr()?.port();
        let file_port = server.file_addr()?.port();
        let tls = server.tls_handle();
        let control = server.control();
        let metrics = server.metrics();
        let metrics_port = server.metrics_addr().map(|a| a.port());
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
            tls,
            control,
            metrics,
            metrics_port,
        });
        Ok(())
    }

    /// The Prometheus endpoint's real port while running (`None` without `metrics_port`).
    #[getter]
    fn metrics_port(&self) -> Option<u16> {
        self.running().as_ref().and_then(|r| r.metrics_port)
    }

    /// What `metrics_port` serves, as a dict: each metric's name to its value, or (for a
    /// metric with a label) to a dict of the label's values; histograms give their `_sum`
    /// and `_count`.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let Some(metrics) = self.running().as_ref().map(|r| r.metrics.clone()) else {
            return Err(PyRuntimeError::new_err("the server is not running"));
        };
        let out = PyDict::new(py);
        for (name, labels, value) in metrics.figures() {
            if name.ends_with("_bucket") {
                continue;
            }
            match labels.first() {
                None => out.set_item(name, value)?,
                Some((_, label)) => {
                    let by = match out.get_item(&name)? {
                        Some(d) => d.cast_into::<PyDict>()?,
                        None => {
                            let d = PyDict::new(py);
                            out.set_item(&name, &d)?;
                            d
                        }
                    };
                    by.set_item(label, value)?;
                }
            }
        }
        Ok(out)
    }

    /// Gives the engine its hooks (before `start()`): each kind's `(time limit in seconds,
    /// fail_open)` or `None`, the custom commands as `(name, usage, help)`, and whether
    /// observations are wanted. Used by `relaychat.Server`; replaces earlier hooks.
    #[pyo3(signature = (*, message = None, login = None, upload = None, command = None, commands = Vec::new(), observe = false))]
    #[allow(clippy::too_many_arguments)]
    fn _install_hooks(
        &self,
        message: Option<(f64, bool)>,
        login: Option<(f64, bool)>,
        upload: Option<(f64, bool)>,
        command: Option<(f64, bool)>,
        commands: Vec<(String, String, String)>,
        observe: bool,
    ) -> PyResult<()> {
        if self.running().is_some() {
            return Err(PyRuntimeError::new_err(
                "hooks are installed before the server starts",
            ));
        }
        let spec = HookSpec {
            message: policy(message)?,
            login: policy(login)?,
            upload: policy(upload)?,
            command: policy(command)?,
            commands: commands
                .into_iter()
                .map(|(name, usage, help)| CustomCommand {
                    name: name.to_lowercase(),
                    usage: one_line(&usage),
                    help: one_line(&help),
                })
                .collect(),
            observe,
        };
        let (hooks, rx) = Hooks::new(spec);
        *self.installed() = Some(InstalledHooks {
            hooks: Arc::new(hooks),
            queue: Arc::new(tokio::sync::Mutex::new(rx)),
        });
        Ok(())
    }

    /// The next requests for the hooks: waits up to `timeout` seconds for one, then takes
    /// what else is waiting, as `(batch, questions, observations)` (see
    /// `super::hooks::Taken`); all three empty when none came; `None` when there are no
    /// hooks.
    fn _next_hooks<'py>(
        &self,
        py: Python<'py>,
        timeout: f64,
    ) -> PyResult<Option<super::hooks::Taken<'py>>> {
        let limit = seconds(Some(timeout))?.unwrap_or_default();
        let Some(queue) = self.installed().as_ref().map(|h| h.queue.clone()) else {
            return Ok(None);
        };
        let batch = block_on(py, super::hooks::next_batch(queue, limit))?;
        batch.map(|b| super::hooks::taken(py, b)).transpose()
    }

    /// Observations dropped because the hooks fell behind (0 without hooks).
    #[getter]
    fn hook_drops(&self) -> u64 {
        self.installed().as_ref().map_or(0, |h| h.hooks.dropped())
    }

    /// Every connected user, in order of arrival.
    fn users(&self) -> PyResult<Vec<String>> {
        Ok(self.control()?.users())
    }

    /// Every group and its members, by group name.
    fn groups(&self) -> PyResult<Vec<(String, Vec<String>)>> {
        Ok(self.control()?.groups())
    }

    /// Sends `[SERVER] <text>` to a user, to `GROUP:<g>`'s members, or (`to=None`) to
    /// everyone; returns how many it reached.
    #[pyo3(signature = (to, text))]
    fn send(&self, to: Option<String>, text: String) -> PyResult<usize> {
        Ok(self.control()?.say(to.as_deref(), &text)?)
    }

    /// Disconnects `user` after `ERROR: kicked: <reason>`; false if not connected.
    fn kick(&self, py: Python<'_>, user: String, reason: String) -> PyResult<bool> {
        let control = self.control()?;
        block_on(py, async move { control.kick(&user, &reason).await })
    }

    /// Re-reads the TLS certificate and key files (what SIGHUP does to `python
    /// server.py`): new handshakes use them, live connections are untouched. Returns the
    /// new certificate's SHA-256 fingerprint; on failure the old certificate stays.
    fn reload_tls(&self, py: Python<'_>) -> PyResult<String> {
        let Some(tls) = self.running().as_ref().map(|r| r.tls.clone()) else {
            return Err(PyRuntimeError::new_err("the server is not running"));
        };
        Ok(py.detach(|| tls.reload())?)
    }

    /// The SHA-256 fingerprint of the certificate in use (`None` without TLS or before
    /// `start()`): what clients pin, or compare on first use.
    #[getter]
    fn tls_fingerprint(&self) -> Option<String> {
        self.running().as_ref().and_then(|r| r.tls.fingerprint())
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

    /// The SQLite database state is kept in (`:memory:`: in memory).
    #[getter]
    fn db(&self) -> PathBuf {
        self.db.clone()
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
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
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

/// `relaychat.SETTINGS`: every limit as `(name, unit, default, help)`, for the command
/// line (`--help` shows the defaults) and the docs.
fn settings_table(py: Python<'_>) -> PyResult<Bound<'_, PyTuple>> {
    let defaults = crate::server::Limits::default();
    let rows = SETTINGS.iter().map(|s| {
        let default = match defaults.get(s.name) {
            Some(Number::Int(n)) => n.into_pyobject(py)?.into_any(),
            Some(Number::Float(f)) => f.into_pyobject(py)?.into_any(),
            None => py.None().into_bound(py),
        };
        let unit = s.unit.name();
        PyTuple::new(
            py,
            [
                s.name.into_pyobject(py)?.into_any(),
                unit.into_pyobject(py)?.into_any(),
                default,
                s.help.into_pyobject(py)?.into_any(),
            ],
        )
    });
    PyTuple::new(py, rows.collect::<PyResult<Vec<_>>>()?)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("SETTINGS", settings_table(m.py())?)?;
    m.add_class::<PyServer>()
}
