//! The one mapping from the engine's [`Error`] to Python exceptions.

use pyo3::create_exception;
use pyo3::exceptions::{PyConnectionError, PyException, PyOSError, PyTimeoutError, PyValueError};
use pyo3::prelude::*;

use crate::Error;

create_exception!(
    _native,
    RelaychatError,
    PyException,
    "Base class of relaychat's own errors."
);
create_exception!(
    _native,
    RefusedError,
    RelaychatError,
    "The server refused the request (an `ERROR: ...` line, or a closed handshake)."
);
create_exception!(
    _native,
    PasswordRequiredError,
    RefusedError,
    "The name is registered on the server and no password was given."
);
create_exception!(
    _native,
    TlsError,
    RelaychatError,
    "TLS failed: the server's certificate is not trusted (wrong host name, unknown issuer, \
     expired, pin mismatch, changed since first use) or the server speaks no TLS."
);
create_exception!(
    _native,
    ProtocolError,
    RelaychatError,
    "The peer broke the wire protocol."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        let text = e.to_string();
        match e {
            Error::Io { .. } => PyOSError::new_err(text),
            Error::Refused(reason) => RefusedError::new_err(reason),
            Error::Protocol(_) => ProtocolError::new_err(text),
            Error::InvalidArgument(_) => PyValueError::new_err(text),
            Error::Closed => PyConnectionError::new_err(text),
            Error::Timeout(_) => PyTimeoutError::new_err(text),
            Error::Store(_) => RelaychatError::new_err(text),
            Error::PasswordRequired(_) => PasswordRequiredError::new_err(text),
            Error::Tls(reason) => TlsError::new_err(reason),
        }
    }
}

pub(super) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("RelaychatError", py.get_type::<RelaychatError>())?;
    m.add("RefusedError", py.get_type::<RefusedError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("TlsError", py.get_type::<TlsError>())?;
    m.add(
        "PasswordRequiredError",
        py.get_type::<PasswordRequiredError>(),
    )?;
    Ok(())
}
