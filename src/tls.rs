//! TLS for STARTTLS (RFC 3207) with rustls and the ring provider: the client
//! configurations for each policy, the sink's server configuration, and the
//! stream that is plaintext until it is upgraded. Configurations are built
//! once per process; a connection only clones an `Arc`.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::Context as _;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde::Deserialize;

/// What volley does about TLS with a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// Never STARTTLS.
    Disabled,
    /// STARTTLS when offered, any certificate; a failed handshake is retried
    /// in plaintext on that host (and remembered for a while).
    #[default]
    Opportunistic,
    /// TLS with any certificate, or no delivery (deferred).
    Required,
    /// TLS with a certificate chain that verifies and matches the MX host name, or no delivery.
    Verify,
}

impl std::str::FromStr for TlsPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disabled" => Ok(TlsPolicy::Disabled),
            "opportunistic" => Ok(TlsPolicy::Opportunistic),
            "required" => Ok(TlsPolicy::Required),
            "verify" => Ok(TlsPolicy::Verify),
            _ => Err(format!(
                "unknown TLS policy {s:?} (disabled, opportunistic, required, verify)"
            )),
        }
    }
}

impl std::fmt::Display for TlsPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TlsPolicy::Disabled => "disabled",
            TlsPolicy::Opportunistic => "opportunistic",
            TlsPolicy::Required => "required",
            TlsPolicy::Verify => "verify",
        })
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client configurations: one that verifies, one that accepts any certificate.
///
/// The verifying one needs the system's trust roots, which take a few
/// milliseconds of file reading and parsing (every file of /etc/ssl/certs):
/// they are read on a side thread when a connection first needs them
/// (`verify` policy only), never on an executor and never when no
/// destination verifies. A `ca_file` is read and checked at start, so a bad
/// one is an error before anything is sent.
#[derive(Clone)]
pub struct TlsClient {
    verify: Arc<VerifyConfig>,
    any: Arc<ClientConfig>,
}

/// The verifying configuration, built once on first use.
struct VerifyConfig {
    /// Certificates of the `ca_file`, trusted beside the system's.
    extra: Vec<CertificateDer<'static>>,
    /// The side thread that reads the roots was started (a flag, not a
    /// `Once`: a second shard asking meanwhile must not wait on the first).
    started: std::sync::atomic::AtomicBool,
    built: std::sync::OnceLock<Result<Arc<ClientConfig>, String>>,
}

impl VerifyConfig {
    fn build(extra: Vec<CertificateDer<'static>>) -> Result<Arc<ClientConfig>, String> {
        let mut roots = RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(native.certs);
        roots.add_parsable_certificates(extra);
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
            .map_err(|e| format!("TLS protocol versions: {e}"))
    }
}

/// The connector a connection asked for, or why it has none yet.
pub enum Connector {
    Ready(futures_rustls::TlsConnector),
    /// The trust roots are being read on a side thread: ask again shortly.
    Loading,
    /// The verifying configuration could not be built.
    Failed(String),
}

impl TlsClient {
    /// Trust roots: the system store (read when first needed), plus the
    /// certificates of `ca_file` (PEM, read and checked now).
    pub fn new(ca_file: Option<&Path>) -> anyhow::Result<TlsClient> {
        let mut extra = Vec::new();
        if let Some(path) = ca_file {
            let certs = read_certs(path)?;
            let (added, _) = RootCertStore::empty().add_parsable_certificates(certs.clone());
            anyhow::ensure!(added > 0, "{}: no usable CA certificate", path.display());
            extra = certs;
        }
        let any = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
            .with_no_client_auth();
        Ok(TlsClient {
            verify: Arc::new(VerifyConfig {
                extra,
                started: std::sync::atomic::AtomicBool::new(false),
                built: std::sync::OnceLock::new(),
            }),
            any: Arc::new(any),
        })
    }

    /// The connector for a policy that negotiates TLS. Never blocks: for
    /// `verify`, the first call starts reading the trust roots on a side
    /// thread and says `Loading` until they are read.
    pub fn connector(&self, policy: TlsPolicy) -> Connector {
        if policy != TlsPolicy::Verify {
            return Connector::Ready(self.any.clone().into());
        }
        if let Some(built) = self.verify.built.get() {
            return match built {
                Ok(c) => Connector::Ready(c.clone().into()),
                Err(e) => Connector::Failed(e.clone()),
            };
        }
        if !self.verify.started.swap(true, std::sync::atomic::Ordering::AcqRel) {
            let v = self.verify.clone();
            let spawned = std::thread::Builder::new()
                .name("volley-tls-roots".into())
                .spawn(move || {
                    let _ = v.built.set(VerifyConfig::build(v.extra.clone()));
                });
            if let Err(e) = spawned {
                let _ = self
                    .verify
                    .built
                    .set(Err(format!("cannot start the thread that reads the trust roots: {e}")));
            }
        }
        Connector::Loading
    }
}

/// Accepts any certificate (opportunistic and `required` TLS encrypt but do
/// not authenticate, as RFC 7435 describes); handshake signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn read_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("bad PEM in {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{}: no certificate found", path.display());
    Ok(certs)
}

/// The sink's TLS: a certificate chain and key from PEM files, or a
/// self-signed certificate for `hostname` made on the spot.
pub fn server_config(cert_key: Option<(&Path, &Path)>, hostname: &str) -> anyhow::Result<Arc<ServerConfig>> {
    let (certs, key) = match cert_key {
        Some((cert, key)) => (
            read_certs(cert)?,
            PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("cannot read a private key from {}", key.display()))?,
        ),
        None => {
            let made = rcgen::generate_simple_self_signed(vec![hostname.to_string()])
                .context("cannot make a self-signed certificate")?;
            let key = PrivateKeyDer::try_from(made.signing_key.serialize_der()).map_err(|e| anyhow::anyhow!("{e}"))?;
            (vec![made.cert.der().clone()], key)
        }
    };
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the certificate and key do not go together")?;
    Ok(Arc::new(config))
}

/// The name to present (SNI) and to verify: a host name, or an address.
pub fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(host.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{host:?}: {e}")))
}

/// Access to the socket under a TLS stream, and what was negotiated.
pub trait TlsLayer: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> &TcpStream;
    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384", for the log.
    fn describe(&self) -> String;
}

fn describe(c: &rustls::CommonState) -> String {
    let version = c
        .protocol_version()
        .map_or_else(|| "TLS".to_string(), |v| format!("{v:?}").replace('_', "."));
    let suite = c
        .negotiated_cipher_suite()
        .map_or_else(String::new, |s| format!(" {:?}", s.suite()));
    format!("{version}{suite}")
}

impl TlsLayer for futures_rustls::client::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
    fn describe(&self) -> String {
        describe(self.get_ref().1)
    }
}

impl TlsLayer for futures_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
    fn describe(&self) -> String {
        describe(self.get_ref().1)
    }
}

/// A connection that starts in plaintext and may be upgraded.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

impl<T: TlsLayer> MaybeTls<T> {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(t) => t.tcp(),
        }
    }
}

impl<T: TlsLayer> AsyncRead for MaybeTls<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: TlsLayer> AsyncWrite for MaybeTls<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_close(cx),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_close(cx),
        }
    }
}
