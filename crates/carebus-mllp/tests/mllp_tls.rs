//! Guards MLLP over TLS with client certificates (IHE ATNA style mutual TLS): a client
//! with a certificate from the trusted CA gets its message stored and acknowledged; a
//! client without a certificate, or with one from another CA, is refused at the
//! handshake and nothing is stored.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use carebus_core::{Broker, BrokerConfig};
use carebus_hl7::{AckCode, parse_ack};
use carebus_mllp::tls::acceptor;
use carebus_mllp::{IngressConfig, IngressStats, frame, serve_tls};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    Ca {
        cert: cert.der().clone(),
        issuer: Issuer::new(params, key),
    }
}

fn leaf(ca: &Ca, names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

fn client_config(
    server_ca: &Ca,
    client: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.cert.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key).unwrap(),
        None => builder.with_no_client_auth(),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

const MESSAGE: &[u8] = b"MSH|^~\\&|MON|ICU|EMR|NG|20261124||ORU^R01|TLS-0001|P|2.5.1\rPID|1||MRN7^^^NG^MR\rOBX|1|NM|HR^Heart rate||72|/min\r";

/// Sends one message over TLS; Some(reply) if the handshake and exchange worked.
async fn send(
    addr: std::net::SocketAddr,
    connector: &tokio_rustls::TlsConnector,
) -> Option<Vec<u8>> {
    let tcp = TcpStream::connect(addr).await.ok()?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .ok()?;
    tls.write_all(&frame(MESSAGE)).await.ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(end) = buf.windows(2).position(|w| w == [0x1c, 0x0d]) {
                return Some(buf[1..end].to_vec());
            }
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    read.ok().flatten()
}

#[tokio::test]
async fn only_clients_with_a_trusted_certificate_get_through() {
    let server_ca = ca("carebus test server CA");
    let client_ca = ca("hospital client CA");
    let other_ca = ca("someone else");
    let (server_cert, server_key) = leaf(&server_ca, &["localhost"]);
    let acceptor = acceptor(
        vec![server_cert],
        server_key,
        Some(vec![client_ca.cert.clone()]),
    )
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let broker = Arc::new(Broker::open(dir.path(), BrokerConfig::default()).unwrap().0);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(serve_tls(
        listener,
        acceptor,
        Arc::clone(&broker),
        IngressConfig::default(),
        Arc::new(IngressStats::default()),
    ));

    // No client certificate, or one from an untrusted CA: refused, nothing stored.
    assert!(send(addr, &client_config(&server_ca, None)).await.is_none());
    assert!(
        send(
            addr,
            &client_config(&server_ca, Some(leaf(&other_ca, &["intruder"])))
        )
        .await
        .is_none()
    );
    assert!(
        broker.topic("hl7.oru").is_err(),
        "nothing may be stored for refused clients"
    );

    // A trusted client: stored and acknowledged.
    let reply = send(
        addr,
        &client_config(&server_ca, Some(leaf(&client_ca, &["icu-gateway"]))),
    )
    .await
    .expect("trusted client refused");
    let ack = parse_ack(&reply).unwrap();
    assert_eq!(ack.code, AckCode::AA);
    assert_eq!(ack.acknowledged_control_id, b"TLS-0001");
    let stored: usize = (0..4)
        .map(|p| broker.read("hl7.oru", p, 0, 10).unwrap().len())
        .sum();
    assert_eq!(stored, 1);
    task.abort();
}
