//! Who gets in: client certificates chaining to the configured CA, and nobody else.

use cis490_tests::client::Client;
use cis490_tests::episode;
use cis490_tests::harness::World;
use cis490_tests::pki::{Naming, Pki, Validity};

use crate::support::start;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_without_a_trusted_current_client_certificate_fail() {
    let w = World::new(1);
    let r = start(&w, "").await;
    let ca = &w.pki.ca_file;
    let good = Client::new(r.addr, ca, &w.pki.client("labhost-01"));
    assert_eq!(good.handshake().await, Ok(()));

    let rogue = Pki::new(&w.path().join("rogue"), "rogue");
    let cases = [
        (
            "other CA",
            Client::new(r.addr, ca, &rogue.client("labhost-01")),
        ),
        (
            "expired",
            Client::new(
                r.addr,
                ca,
                &w.pki
                    .client_with("labhost-01", Naming::DnsSan, Validity::Expired),
            ),
        ),
        (
            "not yet valid",
            Client::new(
                r.addr,
                ca,
                &w.pki
                    .client_with("labhost-01", Naming::DnsSan, Validity::NotYetValid),
            ),
        ),
        (
            "CA cert as client",
            Client::new(r.addr, ca, &w.pki.ca_as_client()),
        ),
    ];
    for (name, c) in cases {
        let err = c.handshake().await.expect_err(name);
        assert!(
            err.contains("certificate")
                || err.contains("alert")
                || err.contains("closed")
                || err.contains("reset"),
            "{name}: {err}"
        );
        let b = episode::body(&w.path().join("src"), "ep1", &w.commits[0], 100);
        let reply = c
            .request(
                "PUT",
                "/v1/episodes/labhost-01/ep1",
                &[("x-cis490-code-commit", b.commit.clone())],
                b.bytes.clone(),
            )
            .await;
        assert!(reply.is_err(), "{name}: a request got through: {reply:?}");
    }
    assert!(!w.store_dir().join("episodes/labhost-01").exists());
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_client_certificate_means_no_handshake() {
    let w = World::new(1);
    let r = start(&w, "").await;
    let roots = cis490_common::tls::load_roots(&w.pki.ca_file).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(cis490_common::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(r.addr).await.unwrap();
    let conn = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await;
    let failed = match conn {
        Err(_) => true,
        Ok(mut s) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"POST /v1/ping HTTP/1.1\r\nhost: x\r\n\r\n")
                .await;
            let mut buf = [0u8; 16];
            !matches!(s.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(failed, "a client without a certificate completed a request");
    r.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_comes_from_the_cn_when_there_is_no_dns_san() {
    let w = World::new(1);
    let r = start(&w, "").await;
    let c = Client::new(
        r.addr,
        &w.pki.ca_file,
        &w.pki
            .client_with("labhost-cn", Naming::CnOnly, Validity::Current),
    );
    let p = c.request("POST", "/v1/ping", &[], vec![]).await.unwrap();
    assert_eq!(p.json()["host_id"], "labhost-cn");
    let b = episode::body(&w.path().join("src"), "ep1", &w.commits[0], 100);
    assert_eq!(c.put("labhost-cn", &b).await.status, 201);
    r.stop().await;
}

/// `openssl s_client` forced to one protocol version; returns its combined output.
fn s_client(w: &World, addr: std::net::SocketAddr, version_flag: &str) -> (bool, String) {
    let me = w.pki.client("labhost-01");
    let out = std::process::Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-servername",
            "localhost",
            version_flag,
        ])
        .args(["-cipher", "DEFAULT:@SECLEVEL=0"])
        .arg("-CAfile")
        .arg(&w.pki.ca_file)
        .arg("-cert")
        .arg(&me.cert)
        .arg("-key")
        .arg(&me.key)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let negotiated = text.contains("Verify return code: 0 (ok)") && !text.contains("alert");
    (negotiated, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_0_and_1_1_are_refused() {
    let w = World::new(1);
    let r = start(&w, "").await;
    let (ok12, text) = tokio::task::block_in_place(|| s_client(&w, r.addr, "-tls1_2"));
    assert!(ok12, "TLS 1.2 should work (control):\n{text}");
    for flag in ["-tls1", "-tls1_1"] {
        let (ok, text) = tokio::task::block_in_place(|| s_client(&w, r.addr, flag));
        assert!(!ok, "{flag} negotiated:\n{text}");
        assert!(
            // rustls answers an old ClientHello with a handshake_failure (40) or protocol_version alert.
            text.contains("alert handshake failure") || text.contains("alert protocol version"),
            "{flag}: {text}"
        );
    }
    r.stop().await;
}
