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
        // A leftover (or planted) temporary file would keep its own permissions: start
        // from a file this call creates.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
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
    #[error(
        "WARNING: {endpoint} WAS VERIFIED BY A CERTIFICATE AUTHORITY BEFORE, and now presents a \
         certificate no authority vouches for ({reason}). Someone may be intercepting the \
         connection. If the server really changed to a self-signed certificate, remove the \
         line for {endpoint} from {file} and connect again."
    )]
    NoLongerVerified {
        endpoint: String,
        reason: String,
        file: String,
    },
    #[error("cannot use {file} for trust on first use: {why}")]
    KnownHosts { file: String, why: String },
    #[error("no known_hosts file for trust on first use (set HOME or XDG_CONFIG_HOME, or give a CA or a pin)")]
    NoKnownHosts,
}

/// What a client trusts.
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

/// What known_hosts says about an endpoint.
#[derive(Debug, PartialEq, Eq)]
enum Known {
    /// Never seen.
    New,
    /// Verified by a CA of the system's trust store: it must stay so.
    Verified,
    /// Trusted on first use with this fingerprint.
    Fingerprint(String),
}

/// The word known_hosts keeps for an endpoint a CA has vouched for.
const VERIFIED: &str = "verified-by-ca";

#[derive(Debug)]
struct Verifier {
    trust: Trust,
    algorithms: WebPkiSupportedAlgorithms,
    /// What to add to known_hosts once the handshake has proved the server holds its key.
    learned: Mutex<Option<String>>,
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

/// What `file` says about `endpoint`. A missing file knows nothing; a file that cannot be
/// read, or a line for the endpoint that cannot be understood, is an error (trusting
/// anything then would defeat the file).
fn lookup(file: &Path, endpoint: &str) -> Result<Known, Distrust> {
    let broken = |why: String| Distrust::KnownHosts {
        file: file.display().to_string(),
        why,
    };
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Known::New),
        Err(e) => return Err(broken(e.to_string())),
    };
    let Some(line) = text
        .lines()
        .find(|line| line.split_whitespace().next() == Some(endpoint))
    else {
        return Ok(Known::New);
    };
    match line.split_whitespace().nth(1) {
        Some(VERIFIED) => Ok(Known::Verified),
        Some(word) => parse_fingerprint(word)
            .map(Known::Fingerprint)
            .ok_or_else(|| broken(format!("its line for {endpoint} is not understood"))),
        None => Err(broken(format!("its line for {endpoint} is not understood"))),
    }
}

/// Whether the system store's refusal only means that no CA it knows vouches for the
/// certificate (self-signed, a private CA), rather than that the certificate is bad.
fn no_known_issuer(e: &rustls::Error) -> bool {
    matches!(
        e,
        rustls::Error::InvalidCertificate(
            // `Other`: webpki's reasons without a variant, such as a self-signed
            // certificate marked as a CA being used as the server's own.
            CertificateError::UnknownIssuer | CertificateError::Other(_)
        )
    )
}

impl Verifier {
    /// Reads what the options name (blocking file reads: run it off the runtime).
    fn new(options: &TlsClientOptions, host: &str, port: u16) -> Result<Self> {
        let trust = match (&options.ca, &options.pin) {
            (Some(_), Some(_)) => {
                return Err(Error::InvalidArgument(
                    "give a CA file or a pin, not both".into(),
                ))
            }
            (Some(ca), None) => {
                let certs = read_certs(ca)?;
                let mut roots = RootCertStore::empty();
                let _ = roots.add_parsable_certificates(certs.iter().cloned());
                // A file holding only the server's own (non-CA) certificate has no usable
                // anchor: then only an exact match is trusted.
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                        .build()
                        .ok();
                Trust::Ca { certs, webpki }
            }
            (None, Some(pin)) => Trust::Pin(parse_fingerprint(pin).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "TLS pin '{pin}' is not a SHA-256 fingerprint (64 hex digits, colons allowed)"
                ))
            })?),
            (None, None) => Trust::Auto {
                system: system_verifier(),
                known_hosts: options.known_hosts.clone().or_else(default_known_hosts),
                endpoint: endpoint(host, port),
            },
        };
        Ok(Self {
            trust,
            algorithms: provider().signature_verification_algorithms,
            learned: Mutex::new(None),
        })
    }

    fn learn(&self, what: String) {
        *self.learned.lock().unwrap_or_else(PoisonError::into_inner) = Some(what);
    }

    /// The system's trust store, then trust on first use; what known_hosts remembers
    /// about the endpoint comes first, so a server once verified by a CA cannot be
    /// downgraded to a self-signed certificate by someone in the middle.
    fn auto(
        &self,
        system: Option<&WebPkiServerVerifier>,
        known_hosts: Option<&Path>,
        endpoint: &str,
        verify: impl Fn(&WebPkiServerVerifier) -> Result<ServerCertVerified, rustls::Error>,
        got: String,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(file) = known_hosts else {
            return match system.map(&verify) {
                Some(Ok(verified)) => Ok(verified),
                Some(Err(e)) if !no_known_issuer(&e) => Err(e),
                _ => Err(distrust(Distrust::NoKnownHosts)),
            };
        };
        let by_ca = || match system {
            Some(system) => verify(system),
            None => Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
        };
        match lookup(file, endpoint).map_err(distrust)? {
            Known::Fingerprint(stored) if stored == got => Ok(ServerCertVerified::assertion()),
            Known::Fingerprint(stored) => Err(distrust(Distrust::Changed {
                endpoint: endpoint.to_owned(),
                stored,
                got,
                file: file.display().to_string(),
            })),
            Known::Verified => by_ca().map_err(|e| match no_known_issuer(&e) {
                true => distrust(Distrust::NoLongerVerified {
                    endpoint: endpoint.to_owned(),
                    reason: e.to_string(),
                    file: file.display().to_string(),
                }),
                false => e,
            }),
            Known::New => match by_ca() {
                Ok(verified) => {
                    self.learn(VERIFIED.to_owned());
                    Ok(verified)
                }
                Err(e) if no_known_issuer(&e) => {
                    self.learn(got);
                    Ok(ServerCertVerified::assertion())
                }
                Err(e) => Err(e),
            },
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
        let verify = |webpki: &WebPkiServerVerifier| {
            webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        };
        match &self.trust {
            Trust::Ca { certs, webpki } => {
                if certs.iter().any(|c| c.as_ref() == end_entity.as_ref()) {
                    return Ok(ServerCertVerified::assertion());
                }
                match webpki {
                    Some(webpki) => verify(webpki),
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
            } => self.auto(
                system.as_deref(),
                known_hosts.as_deref(),
                endpoint,
                verify,
                fingerprint(end_entity),
            ),
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

/// Adds `endpoint`'s line to known_hosts.
fn remember(file: &Path, endpoint: &str, what: &str) -> Result<()> {
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
    writeln!(f, "{endpoint} {what}")
        .map_err(|e| Error::io(format!("cannot write {}", file.display()), e))?;
    tracing::info!("[TLS] {endpoint}: {what} (kept in {})", file.display());
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
    let name = ServerName::try_from(host.to_owned())
        .map_err(|_| Error::InvalidArgument(format!("'{host}' is not a valid server name")))?;
    // Reading the CA file (or, once, the system's trust store) blocks.
    let (options2, host2) = (options.clone(), host.to_owned());
    let verifier = tokio::task::spawn_blocking(move || Verifier::new(&options2, &host2, port))
        .await
        .map_err(|e| tls_error(format_args!("cannot set up TLS: {e}")))??;
    let verifier = Arc::new(verifier);
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tls = connector
        .connect(name, stream)
        .await
        .map_err(|e| handshake_failed(&e, host, port))?;
    let learned = verifier
        .learned
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    if let (
        Some(learned),
        Trust::Auto {
            known_hosts: Some(file),
            endpoint,
            ..
        },
    ) = (learned, &verifier.trust)
    {
        let (file, endpoint) = (file.clone(), endpoint.clone());
        tokio::task::spawn_blocking(move || remember(&file, &endpoint, &learned))
            .await
            .map_err(|e| tls_error(format_args!("cannot record the server: {e}")))??;
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
        ) => format!(
            "{host}:{port} does not speak TLS: it answered in plain text (a server without TLS, \
             or a plain-text refusal such as a full server)"
        ),
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
        remember(&file, "ca.example:2003", VERIFIED).expect("remember");
        std::fs::write(dir.path().join("other"), "x:1 garbage\n").expect("write");
        let known = |endpoint| lookup(&file, endpoint).expect("readable");
        assert_eq!(known("example.org:2003"), Known::Fingerprint(fp));
        assert_eq!(known("[::1]:2003"), Known::Fingerprint(fingerprint(b"b")));
        assert_eq!(known("example.org:2007"), Known::New);
        assert_eq!(known("ca.example:2003"), Known::Verified);
        let other = dir.path().join("other");
        assert!(lookup(&other, "x:1").is_err(), "a line not understood");
        let missing = dir.path().join("missing");
        assert_eq!(lookup(&missing, "x:1").ok(), Some(Known::New));
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
