//! Connections to the database: the driver's configuration from the
//! settings, TLS with rustls, and the bounded pool.

use crate::config::{PostgresSettings, SslMode};
use crate::spool::SpoolError;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::config::Host;
use tokio_postgres_rustls::MakeRustlsConnect;

/// Opening a connection, TLS included, at most.
pub(super) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a free connection before it fails (a push
/// then gets 503, and WeChat retries it).
pub(super) const POOL_WAIT: Duration = Duration::from_secs(2);

/// The URL without its password: host(s), port(s), user and database.
pub fn postgres_display(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let name = match host {
                // What follows an unescaped '@' in a password is taken for
                // the host: never print it.
                Host::Tcp(name) if name.contains('@') => "<invalid host>".to_owned(),
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            };
            match ports.get(i).or(ports.first()) {
                Some(port) => format!("{name}:{port}"),
                None => name,
            }
        })
        .collect();
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let db = config.get_dbname().unwrap_or("");
    format!("postgres://{user}{}/{db}", hosts.join(","))
}

/// The driver's configuration: the URL, the schema as the search path, the
/// timeouts and keepalives that notice a database gone away.
pub(super) fn driver_config(
    settings: &PostgresSettings,
) -> Result<tokio_postgres::Config, SpoolError> {
    let mut config: tokio_postgres::Config = settings
        .url
        .expose()
        .parse()
        .map_err(|e| SpoolError::caused("spool.url is not a connection string", e))?;
    // The schema is a checked identifier, so it needs no quoting here, and
    // every statement can name its tables unqualified.
    // Notices ("already exists, skipping") are not worth a log line. The
    // database bounds each statement as the spool bounds each operation, so
    // one given up on does not run on, holding its connection and locks; and
    // it ends a transaction left idle by a replica that stopped mid-way. A
    // push's commit is durable whatever the server's or role's default says
    // (and waits for a synchronous standby when the server names one).
    config.options(format!(
        "-c search_path={} -c client_min_messages=warning -c statement_timeout={} \
         -c idle_in_transaction_session_timeout={} -c synchronous_commit=on",
        settings.schema,
        super::OPERATION_TIMEOUT.as_millis(),
        3 * super::OPERATION_TIMEOUT.as_millis()
    ));
    config.application_name("wxrelay");
    config.connect_timeout(CONNECT_TIMEOUT);
    // A database host gone without a word (a failover moving its address, a
    // partition) is noticed within seconds, not the system's minutes: the
    // listener's connection included, which waits without sending.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(5));
    config.keepalives_interval(Duration::from_secs(2));
    config.keepalives_retries(3);
    config.tcp_user_timeout(Duration::from_secs(10));
    config.ssl_mode(match settings.sslmode {
        SslMode::Disable => tokio_postgres::config::SslMode::Disable,
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
            tokio_postgres::config::SslMode::Require
        }
    });
    Ok(config)
}

/// The TLS connector for `sslmode`; with `disable` it is never used.
pub(super) fn tls(settings: &PostgresSettings) -> Result<MakeRustlsConnect, SpoolError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = verifier(settings, provider.clone())?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| SpoolError::caused("TLS setup", e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// What is checked of the database's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verification {
    /// Nothing: any certificate is taken (only the handshake's signature
    /// must match it).
    Nothing,
    /// Its chain leads to a trusted root and it is valid now.
    Chain,
    /// As `Chain`, and it names the host connected to.
    ChainAndName,
}

/// What libpq checks for each `sslmode`: `require` verifies nothing,
/// unless a root certificate is given, when it verifies as `verify-ca`.
fn verification(sslmode: SslMode, ca_file: bool) -> Verification {
    match sslmode {
        SslMode::Disable | SslMode::Require if !ca_file => Verification::Nothing,
        SslMode::Disable | SslMode::Require | SslMode::VerifyCa => Verification::Chain,
        SslMode::VerifyFull => Verification::ChainAndName,
    }
}

/// The certificate verifier `sslmode` (and `ca_file`) call for.
fn verifier(
    settings: &PostgresSettings,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, SpoolError> {
    let verification = verification(settings.sslmode, settings.ca_file.is_some());
    if verification == Verification::Nothing {
        return Ok(Arc::new(AnyCertificate(provider)));
    }
    let chain = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(settings)?), provider)
        .build()
        .map_err(|e| SpoolError::caused("TLS setup", e))?;
    Ok(match verification {
        Verification::ChainAndName => chain,
        _ => Arc::new(ChainOnly(chain)),
    })
}

/// `ca_file`'s certificates, or the webpki roots.
fn roots(settings: &PostgresSettings) -> Result<RootCertStore, SpoolError> {
    let Some(file) = &settings.ca_file else {
        return Ok(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        });
    };
    let unreadable = |e: &dyn std::fmt::Display| {
        SpoolError::storage(format!("spool.ca_file {}: {e}", file.display()))
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(file).map_err(|e| unreadable(&e))? {
        let cert = cert.map_err(|e| unreadable(&e))?;
        roots.add(cert).map_err(|e| unreadable(&e))?;
    }
    if roots.is_empty() {
        return Err(unreadable(&"holds no PEM certificate"));
    }
    Ok(roots)
}

/// `sslmode = "verify-ca"`: the chain must lead to a trusted root and the
/// certificate must be valid; only its names are not compared with the host.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The name is checked last, after the chain and the validity period.
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `sslmode = "require"` without a CA: any certificate is taken, as libpq
/// does. The handshake is still checked against the certificate presented,
/// so the connection is encrypted to whoever holds its key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

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
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.0.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A pool: at most `size` connections, a bounded wait for one, and a broken
/// connection (the database restarted) replaced rather than reused.
pub(super) fn pool(
    size: usize,
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
) -> Result<Pool, SpoolError> {
    let manager = Manager::from_config(
        config,
        tls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .wait_timeout(Some(POOL_WAIT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .runtime(Runtime::Tokio1)
        .build()
        .map_err(|e| SpoolError::caused("cannot set up the connection pool", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

    /// A CA (its PEM in a file) and two leaves: one it signed for
    /// `db.internal`, and one signed by nobody.
    struct Certificates {
        _dir: tempfile::TempDir,
        ca_file: std::path::PathBuf,
        signed: CertificateDer<'static>,
        self_signed: CertificateDer<'static>,
    }

    fn certificates() -> Certificates {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let leaf = || CertificateParams::new(vec!["db.internal".to_owned()]).unwrap();
        let signed = leaf()
            .signed_by(&KeyPair::generate().unwrap(), &issuer)
            .unwrap();
        let self_signed = leaf().self_signed(&KeyPair::generate().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        Certificates {
            _dir: dir,
            ca_file,
            signed: signed.der().clone(),
            self_signed: self_signed.der().clone(),
        }
    }

    /// Whether `sslmode` (with `ca_file` or the public roots) takes `cert`
    /// from a server reached as `host`.
    fn takes(
        sslmode: SslMode,
        ca_file: Option<&Certificates>,
        cert: &CertificateDer,
        host: &str,
    ) -> bool {
        let settings = PostgresSettings {
            url: crate::config::Secret::new("postgres://relay@db.internal/relay"),
            display: String::new(),
            schema: "wxrelay".into(),
            pool_size: 1,
            sslmode,
            ca_file: ca_file.map(|c| c.ca_file.clone()),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let name = ServerName::try_from(host.to_owned()).unwrap();
        verifier(&settings, provider)
            .unwrap()
            .verify_server_cert(cert, &[], &name, &[], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn sslmode_means_what_it_means_in_libpq() {
        use Verification::*;
        assert_eq!(verification(SslMode::Require, false), Nothing);
        assert_eq!(verification(SslMode::Require, true), Chain);
        assert_eq!(verification(SslMode::VerifyCa, false), Chain);
        assert_eq!(verification(SslMode::VerifyCa, true), Chain);
        assert_eq!(verification(SslMode::VerifyFull, false), ChainAndName);
        assert_eq!(verification(SslMode::VerifyFull, true), ChainAndName);
    }

    #[test]
    fn each_sslmode_takes_the_certificates_it_should() {
        let c = certificates();
        let (ca, public) = (Some(&c), None);
        let (signed, stranger) = (&c.signed, &c.self_signed);
        // require without a CA: anything, whoever signed it, whatever it names.
        assert!(takes(SslMode::Require, public, stranger, "10.0.0.5"));
        assert!(takes(SslMode::Require, public, signed, "db.internal"));
        // require with a CA, and verify-ca: the chain, not the name.
        for mode in [SslMode::Require, SslMode::VerifyCa] {
            assert!(takes(mode, ca, signed, "10.0.0.5"), "{mode:?}");
            assert!(!takes(mode, ca, stranger, "db.internal"), "{mode:?}");
        }
        assert!(!takes(SslMode::VerifyCa, public, signed, "db.internal"));
        // verify-full: the chain and the name.
        assert!(takes(SslMode::VerifyFull, ca, signed, "db.internal"));
        assert!(!takes(SslMode::VerifyFull, ca, signed, "10.0.0.5"));
        assert!(!takes(SslMode::VerifyFull, ca, signed, "other.internal"));
        assert!(!takes(SslMode::VerifyFull, ca, stranger, "db.internal"));
        assert!(!takes(SslMode::VerifyFull, public, signed, "db.internal"));
    }
}
