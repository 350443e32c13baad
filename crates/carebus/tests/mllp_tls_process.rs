//! Guards MLLP over TLS on the real binary, configured with `[mllp_tls]`: a client with
//! a certificate from the configured client CA gets its message stored and
//! acknowledged; a client without one is refused at the handshake.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{Server, curl};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ca(name: &str) -> (CertificateDer<'static>, String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.der().clone(), cert.pem(), Issuer::new(params, key))
}

fn leaf(
    issuer: &Issuer<'static, KeyPair>,
    name: &str,
) -> (
    CertificateDer<'static>,
    String,
    PrivateKeyDer<'static>,
    String,
) {
    let params = CertificateParams::new(vec![name.to_owned()]).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (
        cert.der().clone(),
        cert.pem(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        key.serialize_pem(),
    )
}

async fn send(
    addr: SocketAddr,
    server_ca: &CertificateDer<'static>,
    client: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Option<String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(server_ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        Some((c, k)) => builder.with_client_auth_cert(vec![c], k).unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .ok()?;
    let msg =
        b"MSH|^~\\&|PACS|RAD|EMR|NG|20261124||ORU^R01|TLS-PROC-1|P|2.5.1\rPID|1||MRN9^^^NG^MR\r";
    tls.write_all(&[&[0x0b][..], msg, &[0x1c, 0x0d]].concat())
        .await
        .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Some(end) = buf.windows(2).position(|w| w == [0x1c, 0x0d]) {
                return Some(String::from_utf8_lossy(&buf[1..end]).into_owned());
            }
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .ok()
    .flatten()
}

#[tokio::test]
async fn mllp_over_mutual_tls_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let (server_ca, _, server_issuer) = ca("server CA");
    let (_, client_ca_pem, client_issuer) = ca("client CA");
    let (_, server_pem, _, server_key_pem) = leaf(&server_issuer, "localhost");
    std::fs::write(dir.path().join("server.pem"), server_pem).unwrap();
    std::fs::write(dir.path().join("server.key"), server_key_pem).unwrap();
    std::fs::write(dir.path().join("clients.pem"), client_ca_pem).unwrap();
    let config = dir.path().join("carebus.toml");
    std::fs::write(
        &config,
        format!(
            "[mllp_tls]\naddr = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            dir.path().join("server.pem").display(),
            dir.path().join("server.key").display(),
            dir.path().join("clients.pem").display()
        ),
    )
    .unwrap();
    let server = Server::start(
        &dir.path().join("data"),
        &["--config", config.to_str().unwrap()],
    );
    server.wait_status("/readyz", 200, Duration::from_secs(30));
    let addr: SocketAddr = server.wait_log("mllp tls listening", Duration::from_secs(30))["fields"]
        ["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    assert!(
        send(addr, &server_ca, None).await.is_none(),
        "a client without a certificate got through"
    );
    let (c, _, k, _) = leaf(&client_issuer, "ward-gateway");
    let ack = send(addr, &server_ca, Some((c, k)))
        .await
        .expect("trusted client refused");
    assert!(ack.contains("MSA|AA|TLS-PROC-1"), "{ack}");
    let (_, body) = curl(&["-s", &server.url("/v1/topics/hl7.oru")]);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let stored: u64 = v["end_offsets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .sum();
    assert_eq!(stored, 1);
    assert_eq!(server.terminate().code(), Some(0));
}
