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
        SslMode::Require | SslMode::VerifyFull => tokio_postgres::config::SslMode::Require,
    });
    Ok(config)
}

/// The TLS connector for `sslmode`; with `disable` it is never used.
pub(super) fn tls(settings: &PostgresSettings) -> Result<MakeRustlsConnect, SpoolError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Arc::new(roots(settings)?);
    let tls_error = |e: rustls::Error| SpoolError::caused("TLS setup", e);
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(tls_error)?;
    let config = match settings.sslmode {
        SslMode::Disable | SslMode::VerifyFull => {
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        SslMode::Require => {
            let chain = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| SpoolError::caused("TLS setup", e))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(chain)))
                .with_no_client_auth()
        }
    };
    Ok(MakeRustlsConnect::new(config))
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

/// `sslmode = "require"`: the chain must lead to a trusted root and the
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
