//! Shared test support: every test gets its own database on the real MongoDB-compatible
//! server (started by `scripts/services.sh up`), dropped when the test ends, so tests run
//! in parallel without seeing each other's data.
#![allow(dead_code)]

use sluice_connectors::Store;
use sluice_core::config::WriteConcernLevel;

/// The server under test; `scripts/services.sh env` prints the same default.
pub fn mongo_uri() -> String {
    std::env::var("SLUICE_MONGODB_URI")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:27017/?directConnection=true".into())
}

const TEST_DB_PREFIX: &str = "sluice_test_";

/// What the tests (and `scripts/test.sh`) name their folders and files in the temp folder.
const TEST_TEMP_PREFIXES: &[&str] = &[
    "sluice-admin-",
    "sluice-api-",
    "sluice-catchup-",
    "sluice-cli-",
    "sluice-configs-",
    "sluice-demo-",
    "sluice-engine-",
    "sluice-export-test-",
    "sluice-geo-",
    "sluice-idle-",
    "sluice-localdir-",
    "sluice-manual-",
    "sluice-missed-",
    "sluice-new-",
    "sluice-own-mongo-",
    "sluice-parts-",
    "sluice-plugin-",
    "sluice-plugins-",
    "sluice-quickstart-",
    "sluice-replicas-",
    "sluice-spool-",
];

/// How old what a test run left behind must be before a later run removes it: far longer
/// than a run, so a run going on beside this one (another checkout) keeps its own.
const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// Once a test process: removes the databases and temporary files of test runs that were
/// killed (or whose drops could not run) at least [`LEFTOVER_AGE`] ago. A drop cleans up
/// after a test that fails, but not after a test binary that is killed, and on a
/// developer's machine those piled up.
async fn sweep_leftovers(store: &Store) {
    static SWEPT: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let now = chrono::Utc::now().timestamp();
            let old = |secs: i64| now - secs > LEFTOVER_AGE.as_secs() as i64;
            if let Ok(names) = store.client().list_database_names().await {
                for name in names {
                    let Some(rest) = name.strip_prefix(TEST_DB_PREFIX) else {
                        continue;
                    };
                    // `<hex seconds>_<id>`. One without a time is left alone: it may
                    // be a live database of a run of an older checkout.
                    let created = rest
                        .split_once('_')
                        .and_then(|(t, _)| i64::from_str_radix(t, 16).ok());
                    if created.is_some_and(old) {
                        let _ = store.client().database(&name).drop().await;
                    }
                }
            }
            // The tests' folders and files in the temp folder, by their names (not the
            // product's own `sluice-work-...`, which it sweeps itself, nor anything else).
            if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
                for entry in entries.flatten() {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !TEST_TEMP_PREFIXES.iter().any(|p| name.starts_with(p)) {
                        continue;
                    }
                    let stale = entry
                        .metadata()
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > LEFTOVER_AGE);
                    if stale {
                        let path = entry.path();
                        let _ =
                            std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                    }
                }
            }
        })
        .await;
}

/// A fresh, uniquely named database, dropped on drop (also when the test panics).
pub struct TestDb {
    pub name: String,
    pub store: Store,
}

impl TestDb {
    pub async fn new() -> Self {
        // Named with its creation time, so leftovers can be told by age.
        let name = format!(
            "{TEST_DB_PREFIX}{:x}_{}",
            chrono::Utc::now().timestamp(),
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let store = Store::connect_uri(&mongo_uri(), &name, &WriteConcernLevel::Majority)
            .await
            .unwrap_or_else(|e| {
                panic!("{e}\n(is the test server running? `scripts/services.sh up`)")
            });
        sweep_leftovers(&store).await;
        Self { name, store }
    }

    /// A fresh database with every collection and index created.
    pub async fn initialized() -> Self {
        let db = Self::new().await;
        db.store.init().await.expect("db init");
        db
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs outside async context: use a private runtime on a helper thread.
        let name = self.name.clone();
        let uri = mongo_uri();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(client) = mongodb::Client::with_uri_str(&uri).await {
                    let _ = client.database(&name).drop().await;
                }
            });
        })
        .join();
    }
}

/// A config for tests: the test database, an ephemeral port, and `adjust` applied to the
/// raw file form before the one validation step.
pub fn test_config(
    database: &str,
    adjust: impl FnOnce(&mut sluice_core::config::RawConfig),
) -> sluice_core::config::Config {
    test_config_with_env(database, &[], adjust)
}

/// `test_config` with `${env:NAME}` values looked up in `vars` before the environment
/// (tests never set process-wide variables: unsound while other test threads run).
pub fn test_config_with_env(
    database: &str,
    vars: &[(&str, &str)],
    adjust: impl FnOnce(&mut sluice_core::config::RawConfig),
) -> sluice_core::config::Config {
    let mut raw = sluice_core::config::RawConfig::default();
    raw.mongodb.uri = mongo_uri();
    raw.mongodb.database = database.to_string();
    raw.server.listen = "127.0.0.1:0".into();
    adjust(&mut raw);
    let env = |k: &str| {
        vars.iter()
            .find(|(name, _)| *name == k)
            .map(|(_, v)| v.to_string())
            .or_else(|| std::env::var(k).ok())
    };
    sluice_core::config::validate("test", &Default::default(), raw, &env)
        .expect("valid test config")
}

/// A running `sluice serve` on an ephemeral port against the test database.
pub async fn start_server(
    db: &TestDb,
    adjust: impl FnOnce(&mut sluice_core::config::RawConfig),
) -> sluice::server::ServerHandle {
    start_server_with_env(db, &[], adjust).await
}

/// `start_server` with `${env:NAME}` values from `vars` (see `test_config_with_env`).
pub async fn start_server_with_env(
    db: &TestDb,
    vars: &[(&str, &str)],
    adjust: impl FnOnce(&mut sluice_core::config::RawConfig),
) -> sluice::server::ServerHandle {
    let config = test_config_with_env(&db.name, vars, adjust);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sluice::server::start(config, db.store.clone(), listener, false)
        .await
        .expect("server starts")
}

/// A fresh S3 bucket on the test S3-compatible server, emptied and removed on drop.
pub struct TestBucket {
    pub name: String,
    pub store: sluice_connectors::objstore::S3Store,
}

/// The test S3 server's `host:port`, for proxies in front of it.
pub fn s3_upstream() -> String {
    std::env::var("SLUICE_S3_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:8333".into())
        .trim_start_matches("http://")
        .to_string()
}

pub fn s3_settings(bucket: &str) -> sluice_connectors::objstore::S3Settings {
    let var = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    sluice_connectors::objstore::S3Settings {
        bucket: bucket.to_string(),
        prefix: "exports".into(),
        endpoint: var("SLUICE_S3_ENDPOINT", "http://127.0.0.1:8333"),
        // Unset, as by default: an S3-compatible endpoint takes the fallback region.
        region: String::new(),
        access_key: var("SLUICE_S3_ACCESS_KEY", "sluice"),
        secret_key: var("SLUICE_S3_SECRET_KEY", "sluice-secret"),
        path_style: true,
        checksums: true,
        ..Default::default()
    }
}

impl TestBucket {
    pub async fn new() -> Self {
        let name = format!(
            "sluice-test-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let store = sluice_connectors::objstore::S3Store::connect(&s3_settings(&name))
            .await
            .expect("S3 client");
        store
            .client()
            .create_bucket()
            .bucket(&name)
            .send()
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "cannot create bucket: {}\n(is the S3 server running? `scripts/services.sh up`)",
                    aws_sdk_s3::error::DisplayErrorContext(e)
                )
            });
        Self { name, store }
    }

    pub fn object_store(&self) -> sluice_connectors::objstore::ObjectStore {
        sluice_connectors::objstore::ObjectStore::S3(self.store.clone())
    }
}

impl Drop for TestBucket {
    fn drop(&mut self) {
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut settings = s3_settings(&name);
                settings.prefix = String::new();
                let Ok(store) = sluice_connectors::objstore::S3Store::connect(&settings).await
                else {
                    return;
                };
                if let Ok(all) = store.list("").await {
                    let keys: Vec<String> = all.into_iter().map(|o| o.key).collect();
                    let _ = store.delete(&keys).await;
                }
                let _ = store.client().delete_bucket().bucket(&name).send().await;
            });
        })
        .join();
    }
}

/// The Python with pyarrow that `scripts/services.sh` installs (an independent Parquet
/// reader for the export tests).
pub fn python() -> String {
    std::env::var("SLUICE_PYTHON").unwrap_or_else(|_| {
        panic!("SLUICE_PYTHON is not set: run the tests through `scripts/test.sh`")
    })
}

/// Runs `script` with the test tools' Python (`python -c SCRIPT ARGS...`), failing the
/// test with its stderr if it fails; returns its stdout.
pub fn run_python<S: AsRef<std::ffi::OsStr>>(
    script: &str,
    args: impl IntoIterator<Item = S>,
) -> Vec<u8> {
    let out = std::process::Command::new(python())
        .args(["-c", script])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The example plugins built by `scripts/build-plugins.sh` (run by `scripts/test.sh`).
pub fn plugin_dir() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/dist");
    assert!(
        dir.join("noop.wasm").exists(),
        "plugins are not built: run `scripts/build-plugins.sh` (scripts/test.sh does)"
    );
    dir
}

/// For a proxy in front of the test MongoDB server: its `host:port`, a listener on a
/// free loopback port, and the URI that reaches the server through that listener.
async fn mongo_proxy_listener() -> (String, tokio::net::TcpListener, String) {
    let uri = mongo_uri();
    let rest = uri.trim_start_matches("mongodb://");
    let host_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxied = format!(
        "mongodb://{}{}",
        listener.local_addr().unwrap(),
        &rest[host_end..]
    );
    (rest[..host_end].to_string(), listener, proxied)
}

/// A TCP proxy to the MongoDB server that can be frozen: while frozen it forwards nothing
/// and closes nothing, which is how a server stuck on a lock looks to the driver.
pub async fn freezable_mongo_proxy() -> (String, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let (uri, frozen, _) = freezable_mongo_proxy_counting().await;
    (uri, frozen)
}

/// [`freezable_mongo_proxy`], also counting the messages to the server it held back while
/// frozen: a test can wait until a write has reached the store instead of sleeping.
pub async fn freezable_mongo_proxy_counting() -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    let (upstream, listener, proxied) = mongo_proxy_listener().await;
    let frozen = std::sync::Arc::new(AtomicBool::new(false));
    let held = std::sync::Arc::new(AtomicUsize::new(0));
    async fn pump(
        mut from: impl AsyncRead + Unpin,
        mut to: impl AsyncWrite + Unpin,
        frozen: std::sync::Arc<AtomicBool>,
        held: Option<std::sync::Arc<AtomicUsize>>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if frozen.load(Ordering::SeqCst) {
                if let Some(held) = &held {
                    held.fetch_add(1, Ordering::SeqCst);
                }
            }
            while frozen.load(Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    let (flag, count) = (frozen.clone(), held.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, flag.clone(), Some(count.clone())));
            tokio::spawn(pump(sr, cw, flag.clone(), None));
        }
    });
    (proxied, frozen, held)
}

/// Waits until `ready` holds, checking every 20 ms; fails the test after 30 s with `what`.
pub async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    mut ready: impl FnMut() -> F,
) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !ready().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A TCP proxy to the MongoDB server that, while `hold` is set, holds back every message
/// to the server containing `pattern` (say, an `aggregate` command on `events`), counting
/// them in `held`; the rest pass. Returns the URI, `hold` and `held`.
pub async fn holding_mongo_proxy(
    pattern: &'static [u8],
) -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, listener, proxied) = mongo_proxy_listener().await;
    let hold = Arc::new(AtomicBool::new(false));
    let held = Arc::new(AtomicUsize::new(0));
    let (flag, count) = (hold.clone(), held.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let (flag, count) = (flag.clone(), count.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if flag.load(Ordering::SeqCst)
                        && buf[..n].windows(pattern.len()).any(|w| w == pattern)
                    {
                        count.fetch_add(1, Ordering::SeqCst);
                        while flag.load(Ordering::SeqCst) {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut sr, &mut cw).await;
            });
        }
    });
    (proxied, hold, held)
}

/// A TCP proxy to the MongoDB server that, while `armed` is set, severs a connection on
/// a message containing `pattern`: the client's side is closed at once (the driver sees
/// the connection break with its request unanswered), and the message is held until
/// `deliver` is set, then sent to the server anyway, as a request still in flight when
/// its connection broke may be. Returns the URI, `armed`, the count of severed messages
/// and `deliver`.
pub async fn severing_mongo_proxy(
    pattern: &'static [u8],
) -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    severing_mongo_proxy_at_most(pattern, usize::MAX).await
}

/// `severing_mongo_proxy` that severs at most `max` messages, then passes the rest (a
/// write that fails once, with the driver's retry, and succeeds the next time).
pub async fn severing_mongo_proxy_at_most(
    pattern: &'static [u8],
    max: usize,
) -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (upstream, listener, proxied) = mongo_proxy_listener().await;
    let armed = Arc::new(AtomicBool::new(false));
    let severed = Arc::new(AtomicUsize::new(0));
    let deliver = Arc::new(AtomicBool::new(false));
    let (a, n, d) = (armed.clone(), severed.clone(), deliver.clone());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut cr, cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let cut = Arc::new(tokio::sync::Notify::new());
            let (armed, severed, deliver, on_cut) = (a.clone(), n.clone(), d.clone(), cut.clone());
            // Replies go to the client until the cut; after it they are read and dropped.
            tokio::spawn(async move {
                let mut cw = Some(cw);
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let read = tokio::select! {
                        r = sr.read(&mut buf) => r,
                        _ = on_cut.notified() => {
                            cw = None;
                            continue;
                        }
                    };
                    let n = match read {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if let Some(w) = cw.as_mut() {
                        if w.write_all(&buf[..n]).await.is_err() {
                            cw = None;
                        }
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if armed.load(Ordering::SeqCst)
                        && buf[..n].windows(pattern.len()).any(|w| w == pattern)
                        && severed
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |k| {
                                (k < max).then_some(k + 1)
                            })
                            .is_ok()
                    {
                        cut.notify_one();
                        drop(cr);
                        while !deliver.load(Ordering::SeqCst) {
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        }
                        let _ = sw.write_all(&buf[..n]).await;
                        // The server's side stays open (its reply is read and dropped).
                        std::future::pending::<()>().await;
                        return;
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (proxied, armed, severed, deliver)
}

/// A store on database `db` reached through `uri` (a proxy in front of the test server).
pub async fn store_via(uri: &str, db: &str) -> Store {
    Store::connect_uri(uri, db, &WriteConcernLevel::Majority)
        .await
        .unwrap()
}

/// A MongoDB-compatible server of the test's own: the binary `scripts/services.sh`
/// installs, on a free loopback port with its data in a temporary folder, stopped and
/// removed on drop. For server parameters (`setParameter`) that would disturb the other
/// tests if set on the shared server.
pub struct OwnMongo {
    pub uri: String,
    child: std::process::Child,
    dir: std::path::PathBuf,
}

/// A loopback port nothing listens on at this moment.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl OwnMongo {
    pub async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    /// On `port` (one a test chose before the server runs: a client pointed at it first).
    pub async fn start_on(port: u16) -> Self {
        let bin = std::env::var("SLUICE_SECANTUS_BIN").expect(
            "SLUICE_SECANTUS_BIN is not set: run the tests with scripts/test.sh, or \
             `eval \"$(scripts/services.sh env)\"` first",
        );
        let dir = std::env::temp_dir().join(format!(
            "sluice-own-mongo-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let child = std::process::Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--storage-path")
            .arg(dir.join("data"))
            .args(["--cache-size", "256M"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let server = Self {
            uri: format!("mongodb://127.0.0.1:{port}/?directConnection=true"),
            child,
            dir,
        };
        // The server answering is this one (another test's listener could have taken
        // the port between its probe and the server's start): its pid says so.
        let mut server = server;
        let pid = i64::from(server.child.id());
        let client =
            mongodb::Client::with_uri_str(format!("{}&serverSelectionTimeoutMS=500", server.uri))
                .await
                .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "the test's own server exited ({status}): {}",
                    std::fs::read_to_string(server.dir.join("server.log")).unwrap_or_default()
                );
            }
            let answer = client
                .database("admin")
                .run_command(bson::doc! { "serverStatus": 1 })
                .await;
            if let Ok(status) = answer {
                let theirs = status
                    .get_i64("pid")
                    .or_else(|_| status.get_i32("pid").map(i64::from))
                    .unwrap_or(-1);
                assert_eq!(theirs, pid, "another server answers on the test's own port");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the test's own server did not answer in 30 s"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        server
    }

    pub async fn client(&self) -> mongodb::Client {
        mongodb::Client::with_uri_str(&self.uri).await.unwrap()
    }

    /// Sets one server parameter (`setParameter`).
    pub async fn set_parameter(&self, name: &str, value: impl Into<bson::Bson>) {
        self.client()
            .await
            .database("admin")
            .run_command(bson::doc! { "setParameter": 1, name: value.into() })
            .await
            .unwrap_or_else(|e| panic!("setParameter {name}: {e}"));
    }
}

impl Drop for OwnMongo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A `tracing` writer keeping what is logged, for a test to read.
#[derive(Clone, Default)]
pub struct Logged(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logged {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logged {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Logged {
    /// A subscriber writing here, as plain text; set it for the current thread (a
    /// `#[tokio::test]` runs the server's tasks on it too).
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        // tracing caches whether a log line is wanted once per line of code, process-wide.
        // With only this subscriber registered, the first thread to reach a line decides
        // for every thread: a sibling test's thread, with no subscriber, would turn the
        // line off for this one too (seen: a span missing from the captured log). A quiet
        // process-wide subscriber means a line reached while this one is set is always
        // asked of it as well.
        static QUIET: std::sync::Once = std::sync::Once::new();
        QUIET.call_once(|| {
            let _ = tracing::subscriber::set_global_default(
                tracing::subscriber::NoSubscriber::default(),
            );
        });
        let logged = self.clone();
        tracing_subscriber::fmt()
            .with_writer(move || logged.clone())
            .with_ansi(false)
            .finish()
    }
}

/// The `sluice` binary, with none of the caller's `SLUICE_*` settings (a developer's token
/// key, write concern or database would otherwise reach the command under test).
pub fn sluice_command() -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    // Nor the caller's AWS and proxy settings, which the S3 client follows.
    let proxies = ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"];
    for (k, _) in std::env::vars() {
        if k.starts_with("SLUICE_")
            || k.starts_with("AWS_")
            || proxies.contains(&k.to_ascii_uppercase().as_str())
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Applies an IMPORT config `nightly`, scheduled daily at a time three hours ago and in
/// effect since two days ago (as if applied then): its latest cron instant is long past
/// any claim, so with no run recorded for it, it is a missed fire. Returns its cron.
pub async fn apply_missed_nightly(db: &TestDb) -> String {
    let at = chrono::Utc::now() - chrono::Duration::hours(3);
    let cron = format!(
        "0 {} {} * * *",
        chrono::Timelike::minute(&at),
        chrono::Timelike::hour(&at)
    );
    apply_scheduled_since(
        db,
        "nightly",
        &cron,
        chrono::Utc::now() - chrono::Duration::days(2),
    )
    .await;
    cron
}

/// Applies an IMPORT config `name` on `cron` (to an address nothing answers at), as
/// scheduled since `since`, with no run recorded.
pub async fn apply_scheduled_since(
    db: &TestDb,
    name: &str,
    cron: &str,
    since: chrono::DateTime<chrono::Utc>,
) {
    let file = sluice_core::integration::parse_file(
        "t",
        &format!("name = \"{name}\"\ntype = \"IMPORT\"\nendpoint = \"http://127.0.0.1:9/x\"\nschedule = \"{cron}\"\n[mapping.productId]\npath = \"$.id\"\n"),
    )
    .unwrap();
    sluice_jobs::configs::apply(&db.store, &file).await.unwrap();
    db.store
        .collection("integration_configs")
        .update_one(
            bson::doc! { "name": name },
            bson::doc! { "$set": { "scheduleSince": bson::DateTime::from_chrono(since) } },
        )
        .await
        .unwrap();
}

/// The value `base`'s `/metrics` shows for the series `series` (its name, with its
/// labels if it has any, as the line begins).
pub async fn metric(base: &str, series: &str) -> f64 {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|n| n.parse::<f64>().unwrap())
        .unwrap_or_else(|| panic!("no {series} in {text}"))
}
