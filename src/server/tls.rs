//! Optional TLS (rustls) on the listener and on the connections that pass requests on to
//! other instances. Files are read once at startup; a problem with one refuses the start with
//! one line naming the setting, the file and the problem.

use crate::config::ServerSection;
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub struct Tls {
    pub acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl Tls {
    /// TLS as the deployment sets it up, or None when `tls_cert_file` and `tls_key_file` are unset.
    pub fn from_settings(server: &ServerSection) -> Result<Option<Arc<Tls>>, String> {
        let (cert_file, key_file) = match (&server.tls_cert_file, &server.tls_key_file) {
            (None, None) => return Ok(None),
            (Some(c), Some(k)) => (c, k),
            _ => return Err("server.tls_cert_file and server.tls_key_file go together: set both or neither".into()),
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = certificates("server.tls_cert_file", cert_file)?;
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| format!("server.tls_key_file {}: no private key in PEM form ({e})", key_file.display()))?;
        let server_config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .map_err(|e| format!("server.tls_cert_file {} and server.tls_key_file {} do not make a usable certificate: {e}", cert_file.display(), key_file.display()))?;
        let mut server_config = server_config;
        server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

        let ca_file = server.tls_peer_ca_file.as_ref().ok_or("server.tls_peer_ca_file is needed with TLS: the CA that signed the instances' certificates, checked when passing requests on")?;
        let mut roots = RootCertStore::empty();
        for ca in certificates("server.tls_peer_ca_file", ca_file)? {
            roots.add(ca).map_err(|e| format!("server.tls_peer_ca_file {}: not a CA certificate ({e})", ca_file.display()))?;
        }
        let mut client_config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client_config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Arc::new(Tls { acceptor: TlsAcceptor::from(Arc::new(server_config)), connector: TlsConnector::from(Arc::new(client_config)) })))
    }

    /// A TLS connection to another instance at `address` (host:port); its certificate must be
    /// signed by the cluster's CA and name that host (a DNS name or an IP address).
    pub async fn connect(&self, address: &str, tcp: tokio::net::TcpStream) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
        let host = address.rsplit_once(':').map_or(address, |(h, _)| h).trim_start_matches('[').trim_end_matches(']');
        let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{address}: {e}"))?;
        self.connector.connect(name, tcp).await.map_err(|e| format!("TLS with {address}: {e}"))
    }
}

fn certificates(setting: &str, file: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(file)
        .map_err(|e| format!("{setting} {}: {e}", file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{setting} {}: not PEM certificates ({e})", file.display()))?;
    if certs.is_empty() {
        return Err(format!("{setting} {}: no certificate in it", file.display()));
    }
    Ok(certs)
}
