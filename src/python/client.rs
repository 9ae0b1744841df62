//! `relaychat.Client` (blocking) and `relaychat.AsyncClient` (asyncio), both thin over
//! [`crate::client::Client`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyStopAsyncIteration;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use tokio::sync::Mutex;

use super::events::PyEvent;
use super::wait::{block_on, seconds};
use crate::client::{Client, ClientConfig, Compression, Event, Events};
use crate::tls::TlsClientOptions;

/// The engine's event stream, shared by a client and its iterators.
type SharedEvents = Arc<Mutex<EventState>>;

struct EventState {
    events: Events,
    /// Set once `Disconnected` has been handed out: iteration is over.
    ended: bool,
}

/// What a look at the queue without waiting found.
enum Ready {
    /// An event.
    Event(Event),
    /// The stream has ended: no event will ever come.
    Ended,
    /// Nothing yet (or another caller holds the queue): wait.
    Wait,
}

/// The next event if one is already queued, without waiting and without the runtime: the
/// fast path that lets a busy bot take events at memory speed.
fn ready_event(events: &SharedEvents) -> Ready {
    let Ok(mut state) = events.try_lock() else {
        return Ready::Wait;
    };
    if state.ended {
        return Ready::Ended;
    }
    match state.events.try_next() {
        Ok(Some(event)) => {
            state.ended = matches!(event, Event::Disconnected);
            Ready::Event(event)
        }
        Ok(None) => Ready::Wait,
        Err(()) => Ready::Ended,
    }
}

/// The next event for a blocking caller: the fast path, else a wait in the runtime.
fn next_event_blocking(
    py: Python<'_>,
    events: &SharedEvents,
    timeout: Option<Duration>,
) -> PyResult<Option<PyEvent>> {
    match ready_event(events) {
        Ready::Event(event) => Ok(Some(PyEvent(event))),
        Ready::Ended => Ok(None),
        Ready::Wait => Ok(block_on(py, next_event(events.clone(), timeout))?.map(PyEvent)),
    }
}

/// The next event, waiting at most `timeout` (`None`: forever). `None` when the wait runs
/// out or the stream has ended.
async fn next_event(events: SharedEvents, timeout: Option<Duration>) -> Option<Event> {
    let mut state = events.lock().await;
    if state.ended {
        return None;
    }
    let event = match timeout {
        Some(limit) => tokio::time::timeout(limit, state.events.next())
            .await
            .ok()
            .flatten(),
        None => state.events.next().await,
    };
    if matches!(event, Some(Event::Disconnected)) {
        state.ended = true;
    }
    event
}

#[allow(clippy::too_many_arguments)] // Python keyword arguments
fn config(
    (host, chat_port, file_port): (String, u16, u16),
    username: String,
    download_dir: PathBuf,
    timeout: f64,
    password: Option<String>,
    tls: Option<TlsClientOptions>,
    (allow_plaintext_login, progress): (bool, bool),
) -> PyResult<ClientConfig> {
    Ok(ClientConfig {
        host,
        chat_port,
        file_port,
        username,
        download_dir,
        timeout: seconds(Some(timeout))?.unwrap_or(Duration::from_secs(10)),
        password,
        tls,
        allow_plaintext_login,
        progress,
    })
}

/// TLS if asked for (`tls`, or a CA or a pin to check the server with), else plain text.
fn tls_options(
    tls: bool,
    ca: Option<PathBuf>,
    pin: Option<String>,
    known_hosts: Option<PathBuf>,
) -> Option<TlsClientOptions> {
    (tls || ca.is_some() || pin.is_some()).then_some(TlsClientOptions {
        ca,
        pin,
        known_hosts,
    })
}

fn shared(events: Events) -> SharedEvents {
    Arc::new(Mutex::new(EventState {
        events,
        ended: false,
    }))
}

/// A connected chat client with blocking methods. Every call releases the GIL and can be
/// interrupted with Ctrl-C.
#[pyclass(module = "relaychat._native", name = "Client", frozen)]
pub struct PyClient {
    client: Client,
    events: SharedEvents,
}

/// Blocking iterator over a client's events.
#[pyclass(module = "relaychat._native", frozen)]
pub struct EventIterator {
    events: SharedEvents,
    timeout: Option<Duration>,
}

#[pymethods]
impl EventIterator {
    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<PyEvent>> {
        next_event_blocking(py, &self.events, self.timeout)
    }
}

/// A connected chat client for asyncio: create it with `await AsyncClient.connect(...)`.
#[pyclass(module = "relaychat._native", name = "AsyncClient", frozen)]
pub struct PyAsyncClient {
    client: Client,
    events: SharedEvents,
}

/// Async iterator over a client's events.
#[pyclass(module = "relaychat._native", frozen)]
pub struct AsyncEventIterator {
    events: SharedEvents,
    timeout: Option<Duration>,
}

#[pymethods]
impl AsyncEventIterator {
    fn __aiter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __anext__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match ready_event(&self.events) {
            Ready::Event(event) => {
                let value = PyEvent(event).into_pyobject(py)?.unbind();
                return Ok(Bound::new(py, Done { value: Some(value) })?.into_any());
            }
            Ready::Ended | Ready::Wait => {}
        }
        let (events, limit) = (self.events.clone(), self.timeout);
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            match next_event(events, limit).await {
                Some(event) => Ok(PyEvent(event)),
                None => Err(PyStopAsyncIteration::new_err(())),
            }
        })
    }
}

/// An awaitable that is already complete: `await` yields its value at once, with no trip
/// through the event loop (used when an event is already queued).
#[pyclass(module = "relaychat._native")]
pub struct Done {
    value: Option<Py<PyAny>>,
}

#[pymethods]
impl Done {
    fn __await__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&mut self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let value = self.value.take().unwrap_or_else(|| py.None());
        Err(pyo3::exceptions::PyStopIteration::new_err((value,)))
    }
}

/// The engine calls and accessors both client classes offer, written once: `Client` blocks
/// on each call (GIL released, Ctrl-C honoured), `AsyncClient` returns an awaitable.
macro_rules! engine_calls {
    (
        $(
            $(#[$attr:meta])*
            fn $name:ident($($arg:ident : $ty:ty),*) -> $ret:ty = |$c:ident| $call:expr;
        )*
        Both { $($both:tt)* }
        Client { $($client_only:tt)* }
        AsyncClient { $($async_only:tt)* }
    ) => {
        #[pymethods]
        impl PyClient {
            $(
                $(#[$attr])*
                fn $name(&self, py: Python<'_>, $($arg: $ty),*) -> PyResult<$ret> {
                    let $c = self.client.clone();
                    Ok(block_on(py, async move { $call.await })??)
                }
            )*
            $($client_only)*
            $($both)*
        }

        #[pymethods]
        impl PyAsyncClient {
            $(
                $(#[$attr])*
                fn $name<'py>(&self, py: Python<'py>, $($arg: $ty),*) -> PyResult<Bound<'py, PyAny>> {
                    let $c = self.client.clone();
                    pyo3_async_runtimes::tokio::future_into_py(py, async move { Ok($call.await?) })
                }
            )*
            $($async_only)*
            $($both)*
        }
    };
}

engine_calls! {
    /// Sends a private message.
    fn msg(to: String, text: String) -> () = |c| c.msg(&to, &text);
    /// Sends a message to every other connected user.
    fn broadcast(text: String) -> () = |c| c.broadcast(&text);
    /// Sends a message to every other member of `group`.
    fn send_group(group: String, text: String) -> () = |c| c.send_group(&group, &text);
    /// Sends one raw command line, exactly as typed.
    fn send_command(line: String) -> () = |c| c.send_command(&line);
    /// The other connected users, in order of arrival.
    fn list_users() -> Vec<String> = |c| c.list_users();
    /// Joins `group` (creating it), returning once the server confirms.
    fn join(group: String) -> () = |c| c.join(&group);
    /// Leaves `group`; the answer comes as an event (`Left` or `NotInGroup`).
    fn leave(group: String) -> () = |c| c.leave(&group);
    /// Sends a file to a user or to `GROUP:<group>`, streaming it from disk; returns the
    /// number of bytes sent. `compress`: `None` when it pays, else always or never.
    #[pyo3(signature = (target, path, compress = None))]
    fn send_file(target: String, path: PathBuf, compress: Option<bool>) -> u64 = |c| {
        let compression = match compress {
            None => Compression::Auto,
            Some(true) => Compression::Always,
            Some(false) => Compression::Never,
        };
        async move { c.send_file(&target, &path, compression).await }
    };
    /// Registers the name we are connected as, with `password` (asked at each later
    /// login); raises `RefusedError` with the server's reason if it is refused.
    fn register(password: String) -> () = |c| c.register(&password);
    /// The last files we sent or received (also to our groups), oldest first, as
    /// `FileEntry` events (registered users).
    fn files() -> Vec<PyEvent> = |c| async move {
        let lines = c.files().await?;
        Ok::<_, crate::Error>(lines.into_iter().map(PyEvent::file).collect::<Vec<PyEvent>>())
    };
    /// Asks for file `id` of the index again; it arrives as a forward (events follow).
    fn get(id: u64) -> () = |c| c.get(id);
    /// Changes our password.
    fn passwd(old: String, new: String) -> () = |c| c.passwd(&old, &new);
    /// The last `count` messages with a user (or in `GROUP:<group>`), oldest first, as
    /// `HistoryEntry` events (registered users).
    #[pyo3(signature = (conversation, count = 20))]
    fn history(conversation: String, count: usize) -> Vec<PyEvent> = |c| async move {
        let entries = c.history(&conversation, count).await?;
        Ok::<_, crate::Error>(entries.into_iter().map(PyEvent::history).collect::<Vec<PyEvent>>())
    };

    Both {
        /// The username this client is connected as.
        #[getter]
        fn username(&self) -> &str {
            self.client.username()
        }

        /// Whether the client is closed or the server has gone.
        #[getter]
        fn closed(&self) -> bool {
            self.client.is_closed()
        }

        /// Whether the server speaks relaychat's extensions (ours does, the lab's does
        /// not): then `send_file` returns only once the server has the whole file saved.
        #[getter]
        fn extended(&self) -> bool {
            self.client.extended()
        }

        fn __repr__(slf: &Bound<'_, Self>) -> PyResult<String> {
            let class = slf.get_type().qualname()?;
            let client = &slf.get().client;
            let (name, closed) = (client.username(), client.is_closed());
            Ok(format!("{class}(username={name:?}, closed={closed})"))
        }
    }

    Client {
        #[new]
        #[pyo3(
            signature = (host = "127.0.0.1".to_owned(), chat_port = 2003, file_port = 2007, *, username, download_dir = PathBuf::from("."), timeout = 10.0, password = None, tls = false, tls_ca = None, tls_pin = None, known_hosts = None, allow_plaintext_login = false, progress = false),
            text_signature = "(host='127.0.0.1', chat_port=2003, file_port=2007, *, username, download_dir='.', timeout=10.0, password=None, tls=False, tls_ca=None, tls_pin=None, known_hosts=None, allow_plaintext_login=False, progress=False)"
        )]
        #[allow(clippy::too_many_arguments)] // Python keyword arguments
        fn new(
            py: Python<'_>,
            host: String,
            chat_port: u16,
            file_port: u16,
            username: String,
            download_dir: PathBuf,
            timeout: f64,
            password: Option<String>,
            tls: bool,
            tls_ca: Option<PathBuf>,
            tls_pin: Option<String>,
            known_hosts: Option<PathBuf>,
            allow_plaintext_login: bool,
            progress: bool,
        ) -> PyResult<Self> {
            let tls = tls_options(tls, tls_ca, tls_pin, known_hosts);
            let cfg = config((host, chat_port, file_port), username, download_dir, timeout, password, tls, (allow_plaintext_login, progress))?;
            let (client, events) = block_on(py, Client::connect(cfg))??;
            Ok(Self {
                client,
                events: shared(events),
            })
        }

        /// The next event, or `None` if none comes within `timeout` seconds (`None`: wait
        /// forever) or the connection has ended.
        #[pyo3(signature = (timeout = None))]
        fn next_event(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<Option<PyEvent>> {
            next_event_blocking(py, &self.events, seconds(timeout)?)
        }

        /// Iterates over events; stops after `Disconnected`, or when none comes within
        /// `timeout` seconds (`None`: never).
        #[pyo3(signature = (timeout = None))]
        fn events(&self, timeout: Option<f64>) -> PyResult<EventIterator> {
            Ok(EventIterator {
                events: self.events.clone(),
                timeout: seconds(timeout)?,
            })
        }

        /// Closes both connections.
        fn close(&self, py: Python<'_>) -> PyResult<()> {
            let c = self.client.clone();
            block_on(py, async move { c.close().await })
        }

        fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
            slf
        }

        #[pyo3(signature = (*_args))]
        fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
            self.close(py)?;
            Ok(false)
        }
    }

    AsyncClient {
        /// Connects both sockets; awaitable.
        #[staticmethod]
        #[pyo3(
            signature = (host = "127.0.0.1".to_owned(), chat_port = 2003, file_port = 2007, *, username, download_dir = PathBuf::from("."), timeout = 10.0, password = None, tls = false, tls_ca = None, tls_pin = None, known_hosts = None, allow_plaintext_login = false, progress = false),
            text_signature = "(host='127.0.0.1', chat_port=2003, file_port=2007, *, username, download_dir='.', timeout=10.0, password=None, tls=False, tls_ca=None, tls_pin=None, known_hosts=None, allow_plaintext_login=False, progress=False)"
        )]
        #[allow(clippy::too_many_arguments)] // Python keyword arguments
        fn connect(
            py: Python<'_>,
            host: String,
            chat_port: u16,
            file_port: u16,
            username: String,
            download_dir: PathBuf,
            timeout: f64,
            password: Option<String>,
            tls: bool,
            tls_ca: Option<PathBuf>,
            tls_pin: Option<String>,
            known_hosts: Option<PathBuf>,
            allow_plaintext_login: bool,
            progress: bool,
        ) -> PyResult<Bound<'_, PyAny>> {
            let tls = tls_options(tls, tls_ca, tls_pin, known_hosts);
            let cfg = config((host, chat_port, file_port), username, download_dir, timeout, password, tls, (allow_plaintext_login, progress))?;
            pyo3_async_runtimes::tokio::future_into_py(py, async move {
                let (client, events) = Client::connect(cfg).await?;
                Ok(PyAsyncClient {
                    client,
                    events: shared(events),
                })
            })
        }

        /// Awaits the next event, or `None` after `timeout` seconds or once the stream ended.
        #[pyo3(signature = (timeout = None))]
        fn next_event<'py>(
            &self,
            py: Python<'py>,
            timeout: Option<f64>,
        ) -> PyResult<Bound<'py, PyAny>> {
            let limit = seconds(timeout)?;
            let events = self.events.clone();
            pyo3_async_runtimes::tokio::future_into_py(py, async move {
                Ok(next_event(events, limit).await.map(PyEvent))
            })
        }

        /// Async iterator over events (`async for`), with the same stopping rules as
        /// `Client.events`.
        #[pyo3(signature = (timeout = None))]
        fn events(&self, timeout: Option<f64>) -> PyResult<AsyncEventIterator> {
            Ok(AsyncEventIterator {
                events: self.events.clone(),
                timeout: seconds(timeout)?,
            })
        }

        fn close<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
            let c = self.client.clone();
            pyo3_async_runtimes::tokio::future_into_py(py, async move {
                c.close().await;
                Ok(())
            })
        }

        fn __aenter__(slf: Bound<'_, Self>) -> PyResult<Bound<'_, PyAny>> {
            let py = slf.py();
            let this = slf.unbind();
            pyo3_async_runtimes::tokio::future_into_py(py, async move { Ok(this) })
        }

        #[pyo3(signature = (*_args))]
        fn __aexit__<'py>(
            &self,
            py: Python<'py>,
            _args: &Bound<'py, PyTuple>,
        ) -> PyResult<Bound<'py, PyAny>> {
            let c = self.client.clone();
            pyo3_async_runtimes::tokio::future_into_py(py, async move {
                c.close().await;
                Ok(false)
            })
        }
    }
}

/// `relaychat.COMMANDS`: every chat command as `(name, usage, help)`, in the order `help`
/// lists them, for clients that complete and explain commands.
fn commands_table(py: Python<'_>) -> PyResult<Bound<'_, PyTuple>> {
    let rows = crate::protocol::command::COMMANDS
        .iter()
        .map(|c| PyTuple::new(py, [c.name, c.usage, c.help]));
    PyTuple::new(py, rows.collect::<PyResult<Vec<_>>>()?)
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("COMMANDS", commands_table(m.py())?)?;
    m.add_class::<PyClient>()?;
    m.add_class::<PyAsyncClient>()?;
    m.add_class::<EventIterator>()?;
    m.add_class::<AsyncEventIterator>()?;
    Ok(())
}
