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

/// Sends one ping over an established HTTP/2 connection.
async fn h2_ping(
    send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Full<bytes::Bytes>>,
) -> Result<u16, String> {
    let req = http::Request::builder()
        .method("POST")
        .uri("https://localhost/v1/ping")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_after_sighup_and_its_open_connection_closes() {
    use cis490_tests::harness::Process;
    use std::time::{Duration, Instant};
    let w = World::new(1);
    let crl = w.path().join("crl.pem");
    std::fs::write(&crl, w.pki.crl(&[])).unwrap();
    let doomed = w.pki.client_serial("labhost-01", 0x0bad_cafe);
    let other = w.pki.client_serial("labhost-02", 0x600d);
    let cfg = w.config(&format!(
        // Keys before the first table of `extra` land in the harness's [tls] table.
        "crl_file = \"{}\"\n[version_gate]\nenabled = false\n",
        crl.display()
    ));
    let p = Process::start(&cfg, &[]);
    let ca = &w.pki.ca_file;
    assert_eq!(Client::new(p.addr, ca, &doomed).handshake().await, Ok(()));
    // A long-lived HTTP/2 connection made before the revocation.
    let (mut send, conn) = cis490_tests::client::h2_connect(p.addr, ca, &doomed).await;
    assert_eq!(h2_ping(&mut send).await, Ok(200));

    std::fs::write(&crl, w.pki.crl(&[0x0bad_cafe])).unwrap();
    p.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    let err = loop {
        match Client::new(p.addr, ca, &doomed).handshake().await {
            Err(e) => break e,
            Ok(()) => {
                assert!(
                    Instant::now() < deadline,
                    "revoked certificate still accepted"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // The refusal is an alert, unless the server's close raced the request the client sent
    // after its half of the handshake (then the alert can be lost to a reset): either way
    // the request got no answer, which an accepted connection always gives.
    let e = err.to_lowercase();
    assert!(
        e.contains("revoked")
            || e.contains("alert")
            || e.contains("connection closed")
            || e.contains("reset"),
        "{err}"
    );
    // The connection made before the reload does not keep the old identity.
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the pre-reload HTTP/2 connection is closed")
        .unwrap()
        .ok();
    assert!(h2_ping(&mut send).await.is_err());
    // Other hosts are unaffected.
    assert_eq!(Client::new(p.addr, ca, &other).handshake().await, Ok(()));
    let log = p.log_text();
    assert!(!log.contains("panicked"), "{log}");

    // An unreadable or malformed CRL is a config error naming the key.
    std::fs::write(&crl, "not a crl\n").unwrap();
    let (code, stderr) = cis490_tests::harness::receiver_check_config(&cfg);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("tls.crl_file"), "{stderr}");
    // So is a CRL of another CA: loaded, it would fail every client handshake. Every `pki
    // init` names its CA alike, so it is the signature that tells them apart.
    let rogue = Pki::new(&w.path().join("rogue"), "rogue");
    std::fs::write(&crl, rogue.crl(&[1])).unwrap();
    let (code, stderr) = cis490_tests::harness::receiver_check_config(&cfg);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("tls.crl_file"), "{stderr}");
    assert!(
        stderr.contains("its signature does not verify with CN=cis490 lab CA"),
        "{stderr}"
    );
    // And a SIGHUP with such a file keeps the previous list in force.
    p.signal(nix::sys::signal::Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(Client::new(p.addr, ca, &doomed).handshake().await.is_err());
    assert_eq!(Client::new(p.addr, ca, &other).handshake().await, Ok(()));
}

fn pki_revoke(dir: &std::path::Path, host: &str) -> (i32, String, String) {
    cis490_tests::harness::output(
        std::process::Command::new(cis490_tests::harness::receiver_bin())
            .args(["pki", "revoke", host, "--dir"])
            .arg(dir),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_revoke_accumulates_a_crl_the_receiver_enforces() {
    let w = World::new(1);
    // A lab PKI directory in the SPEC §14 layout, from the test CA.
    let dir = w.path().join("lab-pki");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&w.pki.ca_file, dir.join("ca.pem")).unwrap();
    std::fs::copy(w.pki.ca_as_client().key, dir.join("ca.key")).unwrap();
    let mut certs = Vec::new();
    for (host, serial) in [
        ("labhost-01", 0x1001u64),
        ("labhost-02", 0x80_0002),
        ("labhost-03", 3),
    ] {
        let c = w.pki.client_serial(host, serial);
        let d = dir.join("hosts").join(host);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(&c.cert, d.join(format!("{host}.pem"))).unwrap();
        certs.push(c);
    }
    let (code, out, err) = pki_revoke(&dir, "labhost-01");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("revoked labhost-01: certificate serial 1001"),
        "{out}"
    );
    assert!(out.contains("1 revoked certificate(s)"), "{out}");
    assert!(out.contains("systemctl reload cis490-receiver"), "{out}");
    let (code, out, _) = pki_revoke(&dir, "labhost-01");
    assert_eq!(code, 0);
    assert!(out.contains("was revoked already"), "{out}");
    // A serial with its high bit set (DER adds a leading zero byte) round-trips too.
    let (code, out, err) = pki_revoke(&dir, "labhost-02");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 revoked certificate(s)"), "{out}");

    let crl = dir.join("crl.pem");
    let cfg = w.config(&format!(
        "crl_file = \"{}\"\n[version_gate]\nenabled = false\n",
        crl.display()
    ));
    let p = receiver_process(&cfg);
    let ca = &w.pki.ca_file;
    for (i, c) in certs.iter().enumerate() {
        let r = Client::new(p.addr, ca, c).handshake().await;
        if i < 2 {
            assert!(r.is_err(), "revoked certificate {i} accepted");
        } else {
            assert_eq!(r, Ok(()), "labhost-03 is not revoked");
        }
    }

    // Errors: no certificate for the host (exit 1, naming the file); a bad id (exit 2).
    let (code, _, err) = pki_revoke(&dir, "labhost-99");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("hosts/labhost-99/labhost-99.pem"), "{err}");
    let before = std::fs::read(&crl).unwrap();
    for bad in ["../etc", "has space", "a/b"] {
        let (code, _, err) = pki_revoke(&dir, bad);
        assert_eq!(code, 2, "{bad}: {err}");
    }
    // A certificate from another CA is not revoked by this one.
    let rogue = Pki::new(&w.path().join("rogue"), "rogue").client("labhost-04");
    let d = dir.join("hosts").join("labhost-04");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::copy(&rogue.cert, d.join("labhost-04.pem")).unwrap();
    let (code, _, err) = pki_revoke(&dir, "labhost-04");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("was not issued by the CA"), "{err}");
    assert_eq!(
        std::fs::read(&crl).unwrap(),
        before,
        "failed revokes change nothing"
    );
}

fn receiver_process(cfg: &std::path::Path) -> cis490_tests::harness::Process {
    cis490_tests::harness::Process::start(cfg, &[])
}
