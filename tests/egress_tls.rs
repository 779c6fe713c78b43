//! TLS that real endpoints need (issue #9, item 8): a real HTTPS endpoint on 127.0.0.1 with
//! certificates made here (rcgen), served with tokio-rustls. Trust from `tls.caFile` and from
//! the system's store (`SSL_CERT_FILE`, through the binary so that the process environment is
//! its own), mutual TLS, certificate failures worded for people, config errors, and the TLS
//! settings kept in dead letters for a redrive without configuration.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use streamdest::config::{Config, Tls};
use streamdest::egress::Outcome;
use support::*;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A certificate authority made for one test.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf certificate for `names`, for servers or clients; `(certificate PEM, key PEM)`.
    fn leaf(&self, names: &[&str], purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, "streamdest test");
        params.extended_key_usages = vec![purpose];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed leaf");
        (cert.pem(), key.serialize_pem())
    }

    fn server(&self, names: &[&str]) -> (String, String) {
        self.leaf(names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self) -> (String, String) {
        self.leaf(&["client.example"], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// Files in a temporary directory.
struct Files(TempDir);

impl Files {
    fn new() -> Files {
        Files(tempfile::tempdir().expect("tempdir"))
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.path().join(name);
        std::fs::write(&path, text).expect("write a test file");
        path
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------------------------
// An HTTPS endpoint
// ---------------------------------------------------------------------------------------------

/// An HTTPS endpoint on 127.0.0.1 answering every request with `statuses` in turn (then the
/// last again).
struct HttpsServer {
    addr: std::net::SocketAddr,
    requests: Arc<AtomicUsize>,
    /// Handshakes the server refused, with rustls's reason.
    refused: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server config presenting `(cert, key)`; with `client_ca`, client certificates issued by
/// it are required.
fn server_config(cert_pem: &str, key_pem: &str, client_ca: Option<&Ca>) -> rustls::ServerConfig {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("server chain");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("server key");
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("protocol versions");
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
                roots.add(cert.expect("CA cert")).expect("CA root");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        }
    };
    builder.with_single_cert(chain, key).expect("server cert")
}

impl HttpsServer {
    async fn start(config: rustls::ServerConfig, statuses: Vec<u16>) -> HttpsServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let requests = Arc::new(AtomicUsize::new(0));
        let refused: Arc<Mutex<Vec<String>>> = Arc::default();
        let statuses = Arc::new(statuses);
        let task = {
            let (requests, refused) = (requests.clone(), refused.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, requests, refused, statuses) = (
                        acceptor.clone(),
                        requests.clone(),
                        refused.clone(),
                        statuses.clone(),
                    );
                    tokio::spawn(async move {
                        let tls = match acceptor.accept(stream).await {
                            Ok(tls) => tls,
                            Err(e) => {
                                refused.lock().unwrap().push(e.to_string());
                                return;
                            }
                        };
                        let service = service_fn(move |req: Request<Incoming>| {
                            let (requests, statuses) = (requests.clone(), statuses.clone());
                            async move {
                                let _ = req.into_body().collect().await;
                                let n = requests.fetch_add(1, Ordering::SeqCst);
                                let status = statuses[n.min(statuses.len() - 1)];
                                Ok::<_, std::convert::Infallible>(
                                    Response::builder()
                                        .status(status)
                                        .body(Full::new(Bytes::new()))
                                        .expect("response"),
                                )
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    });
                }
            })
        };
        HttpsServer {
            addr,
            requests,
            refused,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/v1/profiles", self.addr.port())
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Delivers one export to `url` with `tls` (JSON, or null for none) and no retry; the outcome
/// and the dead-letter entry, if any.
async fn deliver_once(url: &str, tls: Value) -> (Outcome, Option<streamdest::storage::DeadLetter>) {
    let mut extra = json!({"delivery": {"maxRetries": 0, "timeoutMs": 5000}});
    if !tls.is_null() {
        extra["tls"] = tls;
    }
    let (_dir, store) = temp_store();
    let (egress, outcomes) =
        egress_with(vec![destination("d", url, extra)], Some(store.clone()), 4);
    egress
        .submit(export("d", "email:a@b.c", 1))
        .await
        .expect("submit");
    egress.drain().await;
    let outcome = outcomes.all().pop().expect("an outcome").1;
    let entry = store.list(Some("d")).pop();
    (outcome, entry)
}

fn last_error(outcome: &Outcome) -> &str {
    match outcome {
        Outcome::DeadLettered { last_error, .. } => last_error,
        other => panic!("expected a dead letter, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Trust
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_the_ca_in_ca_file_is_trusted() {
    let ca = Ca::new("test CA");
    let files = Files::new();
    let ca_file = files.write("ca.pem", &ca.pem);
    let (cert, key) = ca.server(&["127.0.0.1", "localhost"]);
    let server = HttpsServer::start(server_config(&cert, &key, None), vec![200]).await;

    let (outcome, entry) = deliver_once(&server.url(), json!({"caFile": s(&ca_file)})).await;
    assert_eq!(
        outcome,
        Outcome::Delivered {
            attempts: 1,
            status: 200
        }
    );
    assert!(entry.is_none());
    assert_eq!(server.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_is_dead_lettered_with_a_readable_reason() {
    let ca = Ca::new("private CA");
    let (cert, key) = ca.server(&["127.0.0.1"]);
    let server = HttpsServer::start(server_config(&cert, &key, None), vec![200]).await;

    let (outcome, entry) = deliver_once(&server.url(), Value::Null).await;
    let error = last_error(&outcome);
    assert_eq!(
        error,
        "TLS: the endpoint's certificate is not trusted (unknown issuer); set tls.caFile to its CA"
    );
    let entry = entry.expect("a dead letter");
    assert_eq!(entry.last_error, error);
    assert_eq!(entry.last_status, None);
    assert_eq!(entry.destination.tls, None);
    assert_eq!(server.requests(), 0);

    // Another CA in caFile does not help, and says the same.
    let other = Ca::new("another CA");
    let files = Files::new();
    let ca_file = files.write("other.pem", &other.pem);
    let (outcome, _) = deliver_once(&server.url(), json!({"caFile": s(&ca_file)})).await;
    assert!(
        last_error(&outcome).contains("unknown issuer"),
        "{outcome:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_name_is_dead_lettered_naming_both() {
    let ca = Ca::new("test CA");
    let files = Files::new();
    let ca_file = files.write("ca.pem", &ca.pem);
    let (cert, key) = ca.server(&["other.example", "10.0.0.7"]);
    let server = HttpsServer::start(server_config(&cert, &key, None), vec![200]).await;

    let (outcome, entry) = deliver_once(&server.url(), json!({"caFile": s(&ca_file)})).await;
    let error = last_error(&outcome);
    assert_eq!(
        error,
        "TLS: the endpoint's certificate is for other names (other.example, 10.0.0.7), not \
         127.0.0.1",
        "{error}"
    );
    assert!(entry.is_some());
    assert_eq!(server.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_says_when_it_expired() {
    let ca = Ca::new("test CA");
    let files = Files::new();
    let ca_file = files.write("ca.pem", &ca.pem);
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca.issuer).expect("signed");
    let server = HttpsServer::start(
        server_config(&cert.pem(), &key.serialize_pem(), None),
        vec![200],
    )
    .await;

    let (outcome, _) = deliver_once(&server.url(), json!({"caFile": s(&ca_file)})).await;
    let error = last_error(&outcome);
    assert!(
        error.starts_with(
            "TLS: the endpoint's certificate expired at 2021-01-01T00:00:00Z (it is now 20"
        ),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_certificate_presented_as_the_server_s_own_is_explained() {
    // A self-signed CA certificate serving as the endpoint's certificate, trusted through
    // caFile: webpki refuses it (CaUsedAsEndEntity).
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    let files = Files::new();
    let ca_file = files.write("self.pem", &cert.pem());
    let server = HttpsServer::start(
        server_config(&cert.pem(), &key.serialize_pem(), None),
        vec![200],
    )
    .await;

    let (outcome, _) = deliver_once(&server.url(), json!({"caFile": s(&ca_file)})).await;
    let error = last_error(&outcome);
    assert!(
        error.starts_with("TLS: the endpoint presents a CA certificate as its own (self-signed?)"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------
// Mutual TLS
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_delivers_with_a_client_certificate_and_fails_without() {
    let ca = Ca::new("test CA");
    let files = Files::new();
    let ca_file = files.write("ca.pem", &ca.pem);
    let (cert, key) = ca.server(&["127.0.0.1"]);
    let (client_cert, client_key) = ca.client();
    let client_cert = files.write("client.pem", &client_cert);
    let client_key = files.write("client.key", &client_key);
    let server = HttpsServer::start(server_config(&cert, &key, Some(&ca)), vec![200]).await;

    let (outcome, _) = deliver_once(
        &server.url(),
        json!({"caFile": s(&ca_file), "clientCertFile": s(&client_cert),
               "clientKeyFile": s(&client_key)}),
    )
    .await;
    assert_eq!(
        outcome,
        Outcome::Delivered {
            attempts: 1,
            status: 200
        }
    );
    assert_eq!(server.requests(), 1);

    // Without a client certificate: refused by the server, and said so.
    let (outcome, entry) = deliver_once(&server.url(), json!({"caFile": s(&ca_file)})).await;
    let error = last_error(&outcome);
    assert_eq!(
        error,
        "TLS: the endpoint requires a client certificate; set tls.clientCertFile and \
         tls.clientKeyFile"
    );
    assert!(entry.is_some());
    assert_eq!(server.requests(), 1);

    // A client certificate from a CA the server does not trust.
    let stranger = Ca::new("stranger CA");
    let (other_cert, other_key) = stranger.client();
    let other_cert = files.write("other-client.pem", &other_cert);
    let other_key = files.write("other-client.key", &other_key);
    let (outcome, _) = deliver_once(
        &server.url(),
        json!({"caFile": s(&ca_file), "clientCertFile": s(&other_cert),
               "clientKeyFile": s(&other_key)}),
    )
    .await;
    let error = last_error(&outcome);
    assert!(
        error.starts_with("TLS: the endpoint refused our client certificate"),
        "{error}"
    );
    assert_eq!(server.requests(), 1);
    assert!(
        server.refused.lock().unwrap().len() >= 2,
        "the server refused both handshakes"
    );
}

// ---------------------------------------------------------------------------------------------
// Pools and dead letters
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_with_and_without_tls_settings_share_one_egress() {
    let ca = Ca::new("test CA");
    let files = Files::new();
    let ca_file = files.write("ca.pem", &ca.pem);
    let (cert, key) = ca.server(&["127.0.0.1"]);
    let server = HttpsServer::start(server_config(&cert, &key, None), vec![200]).await;
    let plain = TestServer::always(Reply::ok()).await;
    let no_retry = json!({"maxRetries": 0, "timeoutMs": 5000});
    let destinations = vec![
        destination(
            "trusting",
            &server.url(),
            json!({"tls": {"caFile": s(&ca_file)}, "delivery": no_retry}),
        ),
        destination(
            "same-settings",
            &server.url(),
            json!({"tls": {"caFile": s(&ca_file)}, "delivery": no_retry}),
        ),
        destination("default", &server.url(), json!({"delivery": no_retry})),
        destination("plain", &plain.url("/"), json!({"delivery": no_retry})),
    ];
    let (egress, outcomes) = egress_with(destinations, None, 16);
    for d in ["trusting", "same-settings", "default", "plain"] {
        egress.submit(export(d, "ecid:1", 1)).await.expect("submit");
    }
    egress.drain().await;
    let delivered = |d: &str| {
        outcomes
            .all()
            .iter()
            .find(|(e, _)| e.destination == d)
            .map(|(_, o)| matches!(o, Outcome::Delivered { .. }))
    };
    assert_eq!(delivered("trusting"), Some(true));
    assert_eq!(delivered("same-settings"), Some(true));
    assert_eq!(delivered("default"), Some(false), "{:?}", outcomes.all());
    assert_eq!(delivered("plain"), Some(true));
    assert_eq!(server.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_keeps_the_tls_files_and_is_redriven_without_configuration() {
    let ca = Ca::new("test CA");
    let files = Files::new();
    let ca_file = files.write("ca.pem", &ca.pem);
    let (cert, key) = ca.server(&["127.0.0.1"]);
    let (client_cert, client_key) = ca.client();
    let client_cert = files.write("client.pem", &client_cert);
    let client_key = files.write("client.key", &client_key);
    // 503 first (dead-lettered: no retry), then 200.
    let server = HttpsServer::start(server_config(&cert, &key, Some(&ca)), vec![503, 200]).await;
    let tls = json!({"caFile": s(&ca_file), "clientCertFile": s(&client_cert),
                     "clientKeyFile": s(&client_key)});
    let (_dir, store) = temp_store();
    let (egress, outcomes) = egress_with(
        vec![destination(
            "d",
            &server.url(),
            json!({"tls": tls, "delivery": {"maxRetries": 0, "timeoutMs": 5000}}),
        )],
        Some(store.clone()),
        4,
    );
    egress
        .submit(export("d", "ecid:1", 1))
        .await
        .expect("submit");
    egress.drain().await;
    assert!(matches!(
        outcomes.all()[0].1,
        Outcome::DeadLettered {
            last_status: Some(503),
            ..
        }
    ));
    let entries = store.list(Some("d"));
    assert_eq!(
        entries[0].destination.tls,
        Some(Tls {
            ca_file: Some(s(&ca_file).to_owned()),
            client_cert_file: Some(s(&client_cert).to_owned()),
            client_key_file: Some(s(&client_key).to_owned()),
        })
    );
    drop(egress);

    // A fresh transport, the settings from the store only.
    let report = streamdest::egress::redrive(store.clone(), None).await;
    assert_eq!((report.succeeded, report.failed), (1, 0));
    assert!(store.is_empty());
    assert_eq!(server.requests(), 2);

    // Relative paths are kept absolute, for a redrive from another directory.
    let relative = Tls {
        ca_file: Some("certs/ca.pem".into()),
        ..Tls::default()
    };
    let absolute = relative.absolute();
    let shown = absolute.ca_file.expect("caFile");
    assert!(Path::new(&shown).is_absolute(), "{shown}");
    assert!(shown.ends_with("certs/ca.pem"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_file_gone_at_redrive_time_keeps_the_entry_naming_it() {
    let ca = Ca::new("test CA");
    let files = Files::new();
    let ca_file = files.write("ca.pem", &ca.pem);
    let (_dir, store) = temp_store();
    let (egress, _outcomes) = egress_with(
        vec![destination(
            "d",
            "https://127.0.0.1:9/",
            json!({"tls": {"caFile": s(&ca_file)}, "delivery": {"maxRetries": 0}}),
        )],
        Some(store.clone()),
        4,
    );
    egress
        .submit(export("d", "ecid:1", 1))
        .await
        .expect("submit");
    egress.drain().await;
    // Stored with its settings; the file then disappears before the redrive.
    std::fs::remove_file(&ca_file).expect("remove caFile");
    drop(egress);
    let report = streamdest::egress::redrive(store.clone(), None).await;
    assert_eq!((report.succeeded, report.failed), (0, 1));
    let entry = store.list(Some("d")).pop().expect("still stored");
    assert_eq!(
        entry.last_error,
        format!(
            "cannot re-send: tls.caFile: cannot read {}: No such file or directory",
            ca_file.display()
        )
    );
    assert_eq!(entry.attempts, 1, "no attempt was made");
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

fn config_with_tls(tls: Value) -> Value {
    json!({
        "mergePolicies": [{"id": "mp", "attributeMerge": "timestampOrdered",
                           "identityStitching": "privateGraph"}],
        "audiences": [{"id": "all", "mergePolicy": "mp", "rule": "true"}],
        "destinations": [{"id": "d", "name": "D", "endpoint": "https://collector.example/v1",
                          "audiences": [{"id": "all"}], "tls": tls}]
    })
}

fn config_errors(tls: Value) -> Vec<String> {
    match Config::from_json_str(&config_with_tls(tls).to_string()) {
        Ok(_) => Vec::new(),
        Err(e) => e
            .all()
            .iter()
            .map(|e| format!("{}: {}", e.path, e.message))
            .collect(),
    }
}

#[test]
fn tls_config_errors_name_the_field() {
    let ca = Ca::new("test CA");
    let files = Files::new();
    let ca_file = files.write("ca.pem", &ca.pem);
    let (client_cert, client_key) = ca.client();
    let client_cert = files.write("client.pem", &client_cert);
    let client_key = files.write("client.key", &client_key);
    let missing = files.path("missing.pem");
    let not_pem = files.write("not.pem", "hello\n");

    assert_eq!(
        config_errors(json!({"caFile": s(&missing)})),
        vec![format!(
            "destinations[0].tls.caFile: cannot read {}: No such file or directory",
            missing.display()
        )]
    );
    assert_eq!(
        config_errors(json!({"caFile": s(&not_pem)})),
        vec![format!(
            "destinations[0].tls.caFile: no certificate in {} (expected PEM \"BEGIN \
             CERTIFICATE\" blocks)",
            not_pem.display()
        )]
    );
    assert_eq!(
        config_errors(json!({"caFile": ""})),
        vec!["destinations[0].tls.caFile: must not be empty".to_string()]
    );
    assert_eq!(
        config_errors(json!({"clientCertFile": s(&client_cert)})),
        vec![
            "destinations[0].tls.clientKeyFile: missing: clientCertFile is set, and mutual TLS \
             needs both"
                .to_string()
        ]
    );
    assert_eq!(
        config_errors(json!({"clientKeyFile": s(&client_key)})),
        vec![
            "destinations[0].tls.clientCertFile: missing: clientKeyFile is set, and mutual TLS \
             needs both"
                .to_string()
        ]
    );
    // A key file with no key; a key that is not the certificate's.
    let errors = config_errors(json!({"clientCertFile": s(&client_cert),
                                      "clientKeyFile": s(&client_cert)}));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with(&format!(
            "destinations[0].tls.clientKeyFile: no private key in {}",
            client_cert.display()
        )),
        "{errors:?}"
    );
    let (_, stranger_key) = Ca::new("x").client();
    let stranger_key = files.write("stranger.key", &stranger_key);
    assert_eq!(
        config_errors(json!({"clientCertFile": s(&client_cert),
                             "clientKeyFile": s(&stranger_key)})),
        vec![format!(
            "destinations[0].tls.clientKeyFile: {} is not the key of the certificate in {}",
            stranger_key.display(),
            client_cert.display()
        )]
    );
    // Every problem of the object, and unknown fields with a suggestion.
    let errors = config_errors(json!({"caFle": s(&ca_file), "clientKeyFile": s(&missing)}));
    assert_eq!(
        errors,
        vec![
            "destinations[0].tls.caFle: unknown field, did you mean \"caFile\"?".to_string(),
            "destinations[0].tls.clientCertFile: missing: clientKeyFile is set, and mutual TLS \
             needs both"
                .to_string(),
        ]
    );
    // Valid: nothing to say.
    assert_eq!(
        config_errors(
            json!({"caFile": s(&ca_file), "clientCertFile": s(&client_cert),
                             "clientKeyFile": s(&client_key)})
        ),
        Vec::<String>::new()
    );
    assert_eq!(config_errors(json!({})), Vec::<String>::new());
}

#[test]
fn the_redacted_view_shows_the_tls_paths_and_no_tls_when_none() {
    let ca = Ca::new("test CA");
    let files = Files::new();
    let ca_file = files.write("ca.pem", &ca.pem);
    let config =
        Config::from_json_str(&config_with_tls(json!({"caFile": s(&ca_file)})).to_string())
            .expect("valid");
    let shown = config.redacted_json();
    assert_eq!(
        shown["destinations"][0]["tls"],
        json!({"caFile": s(&ca_file)})
    );
    let mut plain = config_with_tls(Value::Null);
    plain["destinations"][0]
        .as_object_mut()
        .expect("object")
        .remove("tls");
    let config = Config::from_json_str(&plain.to_string()).expect("valid");
    assert!(
        config.redacted_json()["destinations"][0]
            .get("tls")
            .is_none()
    );
}

// ---------------------------------------------------------------------------------------------
// The system's store, through the binary
// ---------------------------------------------------------------------------------------------

fn streamdest(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_streamdest"));
    command
        .args(args)
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .env_remove("RUST_LOG");
    for (k, v) in env {
        command.env(k, v);
    }
    let out = command.output().expect("run streamdest");
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_cert_file_makes_an_endpoint_trusted_without_ca_file() {
    let ca = Ca::new("system-wide private CA");
    let files = Files::new();
    let ca_file = files.write("ca.pem", &ca.pem);
    let (cert, key) = ca.server(&["127.0.0.1"]);
    let server = HttpsServer::start(server_config(&cert, &key, None), vec![200]).await;
    let config = json!({
        "mergePolicies": [{"id": "mp", "attributeMerge": "timestampOrdered",
                           "identityStitching": "privateGraph"}],
        "audiences": [{"id": "all", "mergePolicy": "mp", "rule": "true"}],
        "destinations": [{"id": "d", "name": "D", "endpoint": server.url(),
                          "audiences": [{"id": "all"}],
                          "delivery": {"maxRetries": 0, "timeoutMs": 5000}}]
    });
    let config_path = files.write("config.json", &config.to_string());
    let events_path = files.write(
        "events.ndjson",
        "{\"type\":\"fragment\",\"dataset\":\"crm\",\"id\":\"c1\",\"timestamp\":\
         \"2024-05-01T10:00:00Z\",\"identityMap\":{\"email\":[{\"id\":\"a@x.org\"}]}}\n",
    );
    let data = files.path("data");
    let summary = files.path("summary.json");
    let replay = |env: Vec<(String, String)>| {
        let args: Vec<String> = [
            "replay",
            "--config",
            s(&config_path),
            "--events",
            s(&events_path),
            "--data-dir",
            s(&data),
            "--summary-json",
            s(&summary),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        let summary = summary.clone();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let run = streamdest(&args, &env);
            run.assert_code(0, "replay");
            let summary: Value =
                serde_json::from_str(&std::fs::read_to_string(&summary).expect("summary written"))
                    .expect("summary JSON");
            (run, summary)
        })
    };

    // The system's store does not know the CA: dead-lettered, and the reason is in the log.
    let (run, shown) = replay(Vec::new()).await.expect("replay");
    assert_eq!(
        shown["destinations"]["d"]["deadLettered"],
        1,
        "{}",
        run.describe()
    );
    assert!(
        run.stderr
            .contains("TLS: the endpoint's certificate is not trusted (unknown issuer)"),
        "{}",
        run.describe()
    );
    assert_eq!(server.requests(), 0);

    // SSL_CERT_FILE names the CA: delivered, without caFile.
    let env = vec![("SSL_CERT_FILE".to_string(), s(&ca_file).to_string())];
    let (run, shown) = replay(env.clone()).await.expect("replay");
    assert_eq!(
        shown["destinations"]["d"]["delivered"],
        1,
        "{}",
        run.describe()
    );
    assert_eq!(server.requests(), 1);

    // The first run's dead letter, re-driven with no configuration, under SSL_CERT_FILE.
    let data_dir = s(&data).to_string();
    let run = tokio::task::spawn_blocking(move || {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        streamdest(&["dead-letters", "redrive", "--data-dir", &data_dir], &env)
    })
    .await
    .expect("redrive");
    run.assert_code(0, "redrive");
    assert_eq!(server.requests(), 2);
}

#[test]
fn validate_shows_the_tls_paths_and_refuses_a_missing_file() {
    let ca = Ca::new("test CA");
    let files = Files::new();
    let ca_file = files.write("ca.pem", &ca.pem);
    let good = files.write(
        "good.json",
        &config_with_tls(json!({"caFile": s(&ca_file)})).to_string(),
    );
    let run = streamdest(&["validate", "--config", s(&good)], &[]);
    run.assert_code(0, "validate");
    let shown: Value = serde_json::from_str(&run.stdout).expect("the configuration as JSON");
    assert_eq!(
        shown["destinations"][0]["tls"],
        json!({"caFile": s(&ca_file)})
    );

    let missing = files.path("gone/ca.pem");
    let bad = files.write(
        "bad.json",
        &config_with_tls(json!({"caFile": s(&missing), "clientCertFile": s(&ca_file)})).to_string(),
    );
    let run = streamdest(&["validate", "--config", s(&bad)], &[]);
    assert_ne!(run.code, Some(0), "{}", run.describe());
    for line in [
        format!(
            "destinations[0].tls.caFile: cannot read {}: No such file or directory",
            missing.display()
        ),
        "destinations[0].tls.clientKeyFile: missing: clientCertFile is set, and mutual TLS \
         needs both"
            .to_string(),
    ] {
        assert!(run.stderr.contains(&line), "{line}\n{}", run.describe());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_speak_tls_keeps_the_raw_connection_error() {
    let plain = TestServer::always(Reply::ok()).await;
    let (outcome, _) = deliver_once(&format!("https://{}/x", plain.addr), Value::Null).await;
    assert_eq!(
        last_error(&outcome),
        "connection error: client error (Connect): received corrupt message of type \
         InvalidContentType"
    );
}
