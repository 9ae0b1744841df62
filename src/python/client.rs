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
use crate::client::{Client, ClientConfig, Event, Events};

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

fn config(
    host: String,
    chat_port: u16,
    file_port: u16,
    username: String,
    download_dir: PathBuf,
    timeout: f64,
) -> PyResult<ClientConfig> {
    Ok(ClientConfig {
        host,
        chat_port,
        file_port,
        username,
        download_dir,
        timeout: seconds(Some(timeout))?.unwrap_or(Duration::from_secs(10)),
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

#[pymethods]
impl PyClient {
    #[new]
    #[pyo3(signature = (host = "127.0.0.1".to_owned(), chat_port = 2003, file_port = 2007, *, username, download_dir = PathBuf::from("."), timeout = 10.0))]
    fn new(
        py: Python<'_>,
        host: String,
        chat_port: u16,
        file_port: u16,
        username: String,
        download_dir: PathBuf,
        timeout: f64,
    ) -> PyResult<Self> {
        let cfg = config(host, chat_port, file_port, username, download_dir, timeout)?;
        let (client, events) = block_on(py, Client::connect(cfg))??;
        Ok(Self {
            client,
            events: shared(events),
        })
    }

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

    /// Sends a private message.
    fn msg(&self, py: Python<'_>, to: String, text: String) -> PyResult<()> {
        let c = self.client.clone();
        Ok(block_on(py, async move { c.msg(&to, &text).await })??)
    }

    /// Sends a message to every other connected user.
    fn broadcast(&self, py: Python<'_>, text: String) -> PyResult<()> {
        let c = self.client.clone();
        Ok(block_on(py, async move { c.broadcast(&text).await })??)
    }

    /// Sends a message to every other member of `group`.
    fn send_group(&self, py: Python<'_>, group: String, text: String) -> PyResult<()> {
        let c = self.client.clone();
        Ok(block_on(
            py,
            async move { c.send_group(&group, &text).await },
        )??)
    }

    /// Sends one raw command line, exactly as typed.
    fn send_command(&self, py: Python<'_>, line: String) -> PyResult<()> {
        let c = self.client.clone();
        Ok(block_on(py, async move { c.send_command(&line).await })??)
    }

    /// The other connected users, in order of arrival.
    fn list_users(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        let c = self.client.clone();
        Ok(block_on(py, async move { c.list_users().await })??)
    }

    /// Joins `group` (creating it), returning once the server confirms.
    fn join(&self, py: Python<'_>, group: String) -> PyResult<()> {
        let c = self.client.clone();
        Ok(block_on(py, async move { c.join(&group).await })??)
    }

    /// Sends a file to a user or to `GROUP:<group>`, streaming it from disk; returns the
    /// number of bytes sent.
    fn send_file(&self, py: Python<'_>, target: String, path: PathBuf) -> PyResult<u64> {
        let c = self.client.clone();
        Ok(block_on(
            py,
            async move { c.send_file(&target, &path).await },
        )??)
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

    fn __repr__(&self) -> String {
        format!(
            "Client(username={:?}, closed={})",
            self.client.username(),
            self.client.is_closed()
        )
    }
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

/// Turns an engine call on a cloned client into an awaitable.
macro_rules! awaitable {
    ($py:expr, $slf:expr, |$c:ident| $body:expr) => {{
        let $c = $slf.client.clone();
        pyo3_async_runtimes::tokio::future_into_py($py, async move { Ok($body.await?) })
    }};
}

#[pymethods]
impl PyAsyncClient {
    /// Connects both sockets; awaitable.
    #[staticmethod]
    #[pyo3(signature = (host = "127.0.0.1".to_owned(), chat_port = 2003, file_port = 2007, *, username, download_dir = PathBuf::from("."), timeout = 10.0))]
    fn connect(
        py: Python<'_>,
        host: String,
        chat_port: u16,
        file_port: u16,
        username: String,
        download_dir: PathBuf,
        timeout: f64,
    ) -> PyResult<Bound<'_, PyAny>> {
        let cfg = config(host, chat_port, file_port, username, download_dir, timeout)?;
        pyo3_async_runtimes::tokio::future_into_py(py, async move {
            let (client, events) = Client::connect(cfg).await?;
            Ok(PyAsyncClient {
                client,
                events: shared(events),
            })
        })
    }

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

    fn msg<'py>(&self, py: Python<'py>, to: String, text: String) -> PyResult<Bound<'py, PyAny>> {
        awaitable!(py, self, |c| c.msg(&to, &text))
    }

    fn broadcast<'py>(&self, py: Python<'py>, text: String) -> PyResult<Bound<'py, PyAny>> {
        awaitable!(py, self, |c| c.broadcast(&text))
    }

    fn send_group<'py>(
        &self,
        py: Python<'py>,
        group: String,
        text: String,
    ) -> PyResult<Bound<'py, PyAny>> {
        awaitable!(py, self, |c| c.send_group(&group, &text))
    }

    fn send_command<'py>(&self, py: Python<'py>, line: String) -> PyResult<Bound<'py, PyAny>> {
        awaitable!(py, self, |c| c.send_command(&line))
    }

    fn list_users<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        awaitable!(py, self, |c| c.list_users())
    }

    fn join<'py>(&self, py: Python<'py>, group: String) -> PyResult<Bound<'py, PyAny>> {
        awaitable!(py, self, |c| c.join(&group))
    }

    fn send_file<'py>(
        &self,
        py: Python<'py>,
        target: String,
        path: PathBuf,
    ) -> PyResult<Bound<'py, PyAny>> {
        awaitable!(py, self, |c| c.send_file(&target, &path))
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

    fn __repr__(&self) -> String {
        format!(
            "AsyncClient(username={:?}, closed={})",
            self.client.username(),
            self.client.is_closed()
        )
    }
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

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyClient>()?;
    m.add_class::<PyAsyncClient>()?;
    m.add_class::<EventIterator>()?;
    m.add_class::<AsyncEventIterator>()?;
    Ok(())
}
