//! Certificates from ACME against a real ACME server: Debian's `pebble` (Let's Encrypt's test
//! server) on loopback, with `pebble-challtestsrv` as its DNS so that the test name resolves to
//! 127.0.0.1 and pebble really validates TLS-ALPN-01 against herald's HTTPS port. The served chain
//! is then checked with `openssl s_client` against pebble's root.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::common::{PATIENCE, Server};

const NAME: &str = "herald.test";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn openssl(args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("the openssl CLI is needed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn spawn(program: &str, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} is needed (Debian package pebble): {e}"))
}

/// A CA and, signed by it, pebble's own HTTPS certificate for 127.0.0.1.
fn pebble_tls(dir: &Path) {
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=pebble test CA",
        "-keyout",
        &p("ca.key"),
        "-out",
        &p("ca.pem"),
    ]);
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        &p("pebble.key"),
        "-out",
        &p("pebble.csr"),
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("pebble.csr"),
        "-CA",
        &p("ca.pem"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        &p("ext.cnf"),
        "-out",
        &p("pebble.pem"),
    ]);
}

async fn wait_port(port: u16) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing listens on {port}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn herald_obtains_a_certificate_from_pebble_by_tls_alpn_01_and_serves_it() {
    let dir = tempfile::tempdir().unwrap();
    pebble_tls(dir.path());
    let (acme_port, mgmt_port, dns_port, dns_mgmt_port, herald_port) = (
        free_port(),
        free_port(),
        free_port(),
        free_port(),
        free_port(),
    );
    let config = serde_json::json!({
        "pebble": {
            "listenAddress": format!("127.0.0.1:{acme_port}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt_port}"),
            "certificate": dir.path().join("pebble.pem"),
            "privateKey": dir.path().join("pebble.key"),
            "httpPort": free_port(),
            // Where pebble connects to validate TLS-ALPN-01: herald's HTTPS port.
            "tlsPort": herald_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false
        }
    });
    let config_path = dir.path().join("pebble.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    // Every name resolves to 127.0.0.1 (and to no IPv6 address).
    let _dns = spawn(
        "pebble-challtestsrv",
        &[
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
            "-dns01",
            &format!("127.0.0.1:{dns_port}"),
            "-management",
            &format!("127.0.0.1:{dns_mgmt_port}"),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
        ],
        &[],
    );
    let _pebble = spawn(
        "pebble",
        &[
            "-config",
            config_path.to_str().unwrap(),
            "-dnsserver",
            &format!("127.0.0.1:{dns_port}"),
        ],
        // No random waits, and no nonces rejected on purpose.
        &[("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_WFE_NONCEREJECT", "0")],
    );
    wait_port(acme_port).await;
    wait_port(dns_mgmt_port).await;

    let cache = dir.path().join("acme-cache");
    let server = Server::start_logged(&[
        "--listen",
        &format!("127.0.0.1:{herald_port}"),
        "--acme-domain",
        NAME,
        "--acme-directory",
        &format!("https://127.0.0.1:{acme_port}/dir"),
        "--acme-contact",
        "mailto:admin@herald.test",
        "--acme-cache",
        cache.to_str().unwrap(),
        "--acme-ca-root",
        dir.path().join("ca.pem").to_str().unwrap(),
    ])
    .await;
    assert!(server.url.starts_with("https://"), "{}", server.url);

    // pebble's root, which signs the issued chain (a new one each pebble run).
    let root = dir.path().join("root.pem");
    let fetched = Command::new("curl")
        .args(["-sS", "-k", "-o", root.to_str().unwrap()])
        .arg(format!("https://127.0.0.1:{mgmt_port}/roots/0"))
        .status()
        .await
        .unwrap();
    assert!(fetched.success());

    let resolve = format!("{NAME}:{herald_port}:127.0.0.1");
    let stats = format!("https://{NAME}:{herald_port}/stats");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--http2",
                "--cacert",
                root.to_str().unwrap(),
                "--resolve",
                &resolve,
            ])
            .arg(&stats)
            .output()
            .await
            .unwrap();
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("\"connections\""));
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no certificate from pebble in time; herald logged:\n{}",
            server.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    server.log_line("ACME: obtained a new certificate").await;

    // The chain as served: leaf for the name, issued by pebble, verifying up to its root.
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{herald_port}")])
        .args(["-servername", NAME, "-showcerts", "-verify_return_error"])
        .args(["-CAfile", root.to_str().unwrap(), "-alpn", "h2"])
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("Pebble Intermediate"), "{text}");
    assert!(text.contains("ALPN protocol: h2"), "{text}");
    // The account and the certificate are cached for the next start.
    assert!(std::fs::read_dir(&cache).unwrap().count() >= 2);
}
