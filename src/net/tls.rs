//! TLS on both ports, with rustls and ring as its one crypto provider.
//!
//! * Server: a certificate and key from PEM files (or a self-signed pair made once in the
//!   data directory), swapped in place by [`ServerTls::reload`] without touching live
//!   connections (rustls asks [`Current`] for the certificate at every handshake).
//! * Client: the server's identity is checked by, in this order, a CA file (or the server's
//!   own certificate), a SHA-256 pin, the system's trust store, and otherwise trust on first
//!   use against a `known_hosts` file. Every failure is an [`Error::Tls`] that says which.
//!
//! Only TLS 1.2 and 1.3 with rustls' safe defaults are offered.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;

use crate::{Error, Result};

/// A TLS session over TCP, either side's (boxed: its state is large).
pub type TlsStream = Box<tokio_rustls::TlsStream<TcpStream>>;

/// The first byte of a TLS connection: a handshake record.
pub(crate) const HANDSHAKE_RECORD: u8 = 0x16;

/// File names of the self-signed pair in the data directory.
const SELF_SIGNED_CERT: &str = "relaychat-tls-cert.pem";
const SELF_SIGNED_KEY: &str = "relaychat-tls-key.pem";

/// The one crypto provider (ring).
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A certificate's SHA-256 fingerprint as OpenSSL prints it (`AB:CD:...`).
pub fn fingerprint(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A fingerprint as a user may write it (any case, with or without colons), normalized to
/// [`fingerprint`]'s form; `None` if it is not 32 bytes of hex.
pub fn parse_fingerprint(text: &str) -> Option<String> {
    let hex: String = text
        .trim()
        .trim_start_matches("sha256:")
        .trim_start_matches("SHA256:")
        .chars()
        .filter(|c| *c != ':')
        .collect();
    if hex.len() != 64 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let upper = hex.to_ascii_uppercase();
    Some(
        upper
            .as_bytes()
            .chunks(2)
            .map(|pair| String::from_utf8_lossy(pair).into_owned())
            .collect::<Vec<_>>()
            .join(":"),
    )
}

fn tls_error(what: impl std::fmt::Display) -> Error {
    Error::Tls(what.to_string())
}

/// Reads every certificate of a PEM file.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            tls_error(format_args!(
                "cannot read certificates from {}: {e}",
                path.display()
            ))
        })?;
    if certs.is_empty() {
        return Err(tls_error(format_args!(
            "no certificate in {}",
            path.display()
        )));
    }
    Ok(certs)
}

// ---------------------------------------------------------------------------------------
// Server

/// Where the server's certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// A certificate chain and its private key, PEM files (re-read on reload).
    Files {
        /// The certificate chain, server certificate first.
        cert: PathBuf,
        /// Its private key (PKCS#8, PKCS#1 or SEC1).
        key: PathBuf,
    },
    /// A self-signed pair kept in the data directory, made on first start.
    SelfSigned,
}

/// The certificate rustls hands out at every handshake, replaced by a reload.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.0
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }
}

/// The server's TLS: its acceptor and the files its certificate is read from.
pub struct ServerTls {
    acceptor: tokio_rustls::TlsAcceptor,
    current: Arc<Current>,
    cert: PathBuf,
    key: PathBuf,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Reads a certificate chain and its key, and checks that they belong together.
fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>> {
    let chain = read_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        tls_error(format_args!(
            "cannot read a private key from {}: {e}",
            key.display()
        ))
    })?;
    let pair = CertifiedKey::from_der(chain, key_der, &provider()).map_err(|e| {
        tls_error(format_args!(
            "{} and {} do not make a usable pair: {e}",
            cert.display(),
            key.display()
        ))
    })?;
    Ok(Arc::new(pair))
}

impl ServerTls {
    /// Loads the certificate (making the self-signed pair in `data_dir` first if asked for
    /// and absent; `host` is added to its names).
    pub fn new(source: &TlsSource, data_dir: &Path, host: &str) -> Result<Self> {
        let (cert, key) = match source {
            TlsSource::Files { cert, key } => (cert.clone(), key.clone()),
            TlsSource::SelfSigned => self_signed(data_dir, host)?,
        };
        let current = Arc::new(Current(RwLock::new(load_pair(&cert, &key)?)));
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(tls_error)?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            current,
            cert,
            key,
        })
    }

    /// Re-reads the certificate and key files; on success new handshakes use them (live
    /// connections keep theirs). On failure the old pair stays.
    pub fn reload(&self) -> Result<String> {
        let pair = load_pair(&self.cert, &self.key)?;
        *self
            .current
            .0
            .write()
            .unwrap_or_else(PoisonError::into_inner) = pair;
        Ok(self.fingerprint())
    }

    /// The SHA-256 fingerprint of the certificate in use.
    pub fn fingerprint(&self) -> String {
        let pair = self
            .current
            .0
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        pair.cert
            .first()
            .map_or_else(String::new, |c| fingerprint(c))
    }

    /// The certificate file in use.
    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// Completes the server side of a handshake on `stream`.
    pub(crate) async fn accept(&self, stream: TcpStream) -> std::io::Result<TlsStream> {
        let tls = self.acceptor.accept(stream).await?;
        Ok(Box::new(tokio_rustls::TlsStream::Server(tls)))
    }
}

/// The self-signed pair in `dir`, made (valid for localhost, the loopback addresses and
/// `host`) if it is not there yet. The key is written owner-only, each file atomically.
fn self_signed(dir: &Path, host: &str) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join(SELF_SIGNED_CERT), dir.join(SELF_SIGNED_KEY));
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let unspecified = host
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified());
    if !host.is_empty() && !unspecified && !names.iter().any(|n| n == host) {
        names.push(host.to_owned());
    }
    let made = rcgen::generate_simple_self_signed(names).map_err(tls_error)?;
    write_private(&key, made.signing_key.serialize_pem().as_bytes(), 0o600)?;
    write_private(&cert, made.cert.pem().as_bytes(), 0o644)?;
    tracing::info!("[TLS] made a self-signed certificate: {}", cert.display());
    Ok((cert, key))
}

/// Writes `bytes` to `path` through a temporary file renamed into place.
fn write_private(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("pem.tmp");
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(format!("cannot write {}", path.display()), e)
    })
}

// ---------------------------------------------------------------------------------------
// Client

/// How the client checks the server's identity (see the module docs for the order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsClientOptions {
    /// A PEM file of trusted CA certificates, or of the server's own certificate.
    pub ca: Option<PathBuf>,
    /// The SHA-256 fingerprint the server's certificate must have.
    pub pin: Option<String>,
    /// Where trust on first use keeps fingerprints (`None`: the default under the user's
    /// config directory, see [`default_known_hosts`]).
    pub known_hosts: Option<PathBuf>,
}

/// `$XDG_CONFIG_HOME/relaychat/known_hosts`, or `~/.config/relaychat/known_hosts`.
pub fn default_known_hosts() -> Option<PathBuf> {
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(config.join("relaychat").join("known_hosts"))
}

/// Why a certificate that rustls would parse is refused by our own checks.
#[derive(Debug, thiserror::Error)]
enum Distrust {
    #[error("the server's certificate does not match the pin: expected {expected}, got {got}")]
    Pin { expected: String, got: String },
    #[error(
        "WARNING: THE SERVER'S CERTIFICATE HAS CHANGED since you first connected to {endpoint}.\n\
         Someone may be intercepting the connection, or the server has a new certificate.\n\
         \x20 fingerprint you trusted: {stored}\n\
         \x20 fingerprint it presents: {got}\n\
         If the change is expected, remove the line for {endpoint} from {file} and connect again."
    )]
    Changed {
        endpoint: String,
        stored: String,
        got: String,
        file: String,
    },
    #[error("no known_hosts file for trust on first use (set HOME or XDG_CONFIG_HOME, or give a CA or a pin)")]
    NoKnownHosts,
}

/// What the client trusts.
#[derive(Debug)]
enum Trust {
    /// A CA file: its CAs, or exactly one of its certificates.
    Ca {
        certs: Vec<CertificateDer<'static>>,
        webpki: Option<Arc<WebPkiServerVerifier>>,
    },
    /// One fingerprint.
    Pin(String),
    /// The system's trust store, else the fingerprint seen first for `endpoint`.
    Auto {
        system: Option<Arc<WebPkiServerVerifier>>,
        known_hosts: Option<PathBuf>,
        endpoint: String,
    },
}

#[derive(Debug)]
struct Verifier {
    trust: Trust,
    algorithms: WebPkiSupportedAlgorithms,
    /// A fingerprint trusted on first use, to be recorded once the handshake has proved
    /// the server holds its key.
    first_use: Mutex<Option<String>>,
}

/// The system's trust store as a verifier, loaded once (`None` if it has no usable CA).
fn system_verifier() -> Option<Arc<WebPkiServerVerifier>> {
    static SYSTEM: OnceLock<Option<Arc<WebPkiServerVerifier>>> = OnceLock::new();
    SYSTEM
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let _ = roots.add_parsable_certificates(found.certs);
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .ok()
        })
        .clone()
}

/// The stored fingerprint for `endpoint` in a known_hosts file.
fn known_fingerprint(file: &Path, endpoint: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some(endpoint))
            .then(|| words.next().and_then(parse_fingerprint))
            .flatten()
    })
}

impl Verifier {
    fn new(options: &TlsClientOptions, host: &str, port: u16) -> Result<Self> {
        let trust = if let Some(ca) = &options.ca {
            let certs = read_certs(ca)?;
            let mut roots = RootCertStore::empty();
            let _ = roots.add_parsable_certificates(certs.iter().cloned());
            // A file holding only the server's own (non-CA) certificate has no usable
            // anchor: then only an exact match is trusted.
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .ok();
            Trust::Ca { certs, webpki }
        } else if let Some(pin) = &options.pin {
            let pin = parse_fingerprint(pin).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "TLS pin '{pin}' is not a SHA-256 fingerprint (64 hex digits, colons allowed)"
                ))
            })?;
            Trust::Pin(pin)
        } else {
            Trust::Auto {
                system: system_verifier(),
                known_hosts: options.known_hosts.clone().or_else(default_known_hosts),
                endpoint: endpoint(host, port),
            }
        };
        Ok(Self {
            trust,
            algorithms: provider().signature_verification_algorithms,
            first_use: Mutex::new(None),
        })
    }

    fn trust_on_first_use(
        &self,
        known_hosts: Option<&Path>,
        endpoint: &str,
        got: String,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(file) = known_hosts else {
            return Err(distrust(Distrust::NoKnownHosts));
        };
        match known_fingerprint(file, endpoint) {
            Some(stored) if stored == got => Ok(ServerCertVerified::assertion()),
            Some(stored) => Err(distrust(Distrust::Changed {
                endpoint: endpoint.to_owned(),
                stored,
                got,
                file: file.display().to_string(),
            })),
            None => {
                *self
                    .first_use
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(got);
                Ok(ServerCertVerified::assertion())
            }
        }
    }
}

fn distrust(why: Distrust) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(why))))
}

/// How a server is named in known_hosts: `host:port` (`[v6]:port` for IPv6 addresses).
fn endpoint(host: &str, port: u16) -> String {
    match host.contains(':') {
        true => format!("[{host}]:{port}"),
        false => format!("{host}:{port}"),
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.trust {
            Trust::Ca { certs, webpki } => {
                if certs.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
                    return Ok(ServerCertVerified::assertion());
                }
                match webpki {
                    Some(webpki) => webpki.verify_server_cert(
                        end_entity,
                        intermediates,
                        server_name,
                        ocsp_response,
                        now,
                    ),
                    None => Err(rustls::Error::InvalidCertificate(
                        CertificateError::UnknownIssuer,
                    )),
                }
            }
            Trust::Pin(expected) => {
                let got = fingerprint(end_entity);
                match &got == expected {
                    true => Ok(ServerCertVerified::assertion()),
                    false => Err(distrust(Distrust::Pin {
                        expected: expected.clone(),
                        got,
                    })),
                }
            }
            Trust::Auto {
                system,
                known_hosts,
                endpoint,
            } => {
                if let Some(system) = system {
                    match system.verify_server_cert(
                        end_entity,
                        intermediates,
                        server_name,
                        ocsp_response,
                        now,
                    ) {
                        Ok(verified) => return Ok(verified),
                        // Not from a public CA (self-signed, a private CA): trust on first use.
                        Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)) => {
                        }
                        Err(e) => return Err(e),
                    }
                }
                self.trust_on_first_use(known_hosts.as_deref(), endpoint, fingerprint(end_entity))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Records a fingerprint trusted on first use.
fn remember(file: &Path, endpoint: &str, fingerprint: &str) -> Result<()> {
    use std::io::Write;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("cannot create {}", dir.display()), e))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map_err(|e| Error::io(format!("cannot open {}", file.display()), e))?;
    writeln!(f, "{endpoint} {fingerprint}")
        .map_err(|e| Error::io(format!("cannot write {}", file.display()), e))?;
    tracing::info!(
        "[TLS] trusting {endpoint} on first use: {fingerprint} (kept in {})",
        file.display()
    );
    Ok(())
}

/// Opens TLS on a connected `stream` to `host:port`, checking the server as `options`
/// say (the client engine's way in; public for the load generator).
pub async fn connect(
    stream: TcpStream,
    host: &str,
    port: u16,
    options: &TlsClientOptions,
) -> Result<TlsStream> {
    let verifier = Arc::new(Verifier::new(options, host, port)?);
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| Error::InvalidArgument(format!("'{host}' is not a valid server name")))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = connector
        .connect(name, stream)
        .await
        .map_err(|e| handshake_failed(&e, host, port))?;
    let first_use = verifier
        .first_use
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let (
        Some(seen),
        Trust::Auto {
            known_hosts: Some(file),
            endpoint,
            ..
        },
    ) = (first_use, &verifier.trust)
    {
        remember(file, endpoint, &seen)?;
    }
    Ok(Box::new(tokio_rustls::TlsStream::Client(tls)))
}

/// What a failed client handshake means, in words.
fn handshake_failed(e: &std::io::Error, host: &str, port: u16) -> Error {
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    let text = match inner {
        Some(rustls::Error::InvalidCertificate(c)) => match c {
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the server's certificate is not valid for '{host}' (wrong host name)")
            }
            CertificateError::UnknownIssuer => {
                "the server's certificate is signed by an unknown issuer (give the CA or the server's certificate, or a pin)"
                    .to_owned()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired".to_owned()
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "the server's certificate is not valid yet".to_owned()
            }
            CertificateError::Other(other) => other.to_string(),
            other => format!("the server's certificate was refused: {other}"),
        },
        Some(
            rustls::Error::InvalidMessage(_)
            | rustls::Error::InappropriateMessage { .. }
            | rustls::Error::InappropriateHandshakeMessage { .. },
        ) => format!("{host}:{port} does not speak TLS (it answered with something else)"),
        Some(rustls::Error::AlertReceived(alert)) => {
            format!("{host}:{port} refused the TLS handshake ({alert:?})")
        }
        Some(other) => format!("TLS handshake with {host}:{port} failed: {other}"),
        None if matches!(
            e.kind(),
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
        ) =>
        {
            format!("{host}:{port} does not speak TLS (it closed the connection during the handshake)")
        }
        None => format!("TLS handshake with {host}:{port} failed: {e}"),
    };
    Error::Tls(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_any_common_spelling() {
        let fp = fingerprint(b"certificate");
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert_eq!(parse_fingerprint(&fp).as_deref(), Some(fp.as_str()));
        let bare = fp.replace(':', "").to_ascii_lowercase();
        assert_eq!(parse_fingerprint(&bare).as_deref(), Some(fp.as_str()));
        assert_eq!(
            parse_fingerprint(&format!("sha256:{bare}")).as_deref(),
            Some(fp.as_str())
        );
        assert_eq!(parse_fingerprint("AB:CD"), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
    }

    #[test]
    fn known_hosts_lines_are_found_by_endpoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("known_hosts");
        let fp = fingerprint(b"a");
        remember(&file, &endpoint("example.org", 2003), &fp).expect("remember");
        remember(&file, &endpoint("::1", 2003), &fingerprint(b"b")).expect("remember");
        assert_eq!(known_fingerprint(&file, "example.org:2003"), Some(fp));
        assert_eq!(
            known_fingerprint(&file, "[::1]:2003"),
            Some(fingerprint(b"b"))
        );
        assert_eq!(known_fingerprint(&file, "example.org:2007"), None);
    }

    #[test]
    fn the_self_signed_pair_is_made_once_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ServerTls::new(&TlsSource::SelfSigned, dir.path(), "0.0.0.0").expect("made");
        let again = ServerTls::new(&TlsSource::SelfSigned, dir.path(), "0.0.0.0").expect("kept");
        assert_eq!(first.fingerprint(), again.fingerprint());
        use std::os::unix::fs::PermissionsExt;
        let key = std::fs::metadata(dir.path().join(SELF_SIGNED_KEY)).expect("key");
        assert_eq!(key.permissions().mode() & 0o777, 0o600);
        assert_eq!(first.reload().expect("reloads"), first.fingerprint());
    }
}
