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

/// A fresh, uniquely named database, dropped on drop (also when the test panics).
pub struct TestDb {
    pub name: String,
    pub store: Store,
}

impl TestDb {
    pub async fn new() -> Self {
        let name = format!(
            "sluice_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let store = Store::connect_uri(&mongo_uri(), &name, &WriteConcernLevel::Majority)
            .await
            .unwrap_or_else(|e| {
                panic!("{e}\n(is the test server running? `scripts/services.sh up`)")
            });
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
    let mut raw = sluice_core::config::RawConfig::default();
    raw.mongodb.uri = mongo_uri();
    raw.mongodb.database = database.to_string();
    raw.server.listen = "127.0.0.1:0".into();
    adjust(&mut raw);
    sluice_core::config::validate("test", &Default::default(), raw, &|k| std::env::var(k).ok())
        .expect("valid test config")
}

/// A running `sluice serve` on an ephemeral port against the test database.
pub async fn start_server(
    db: &TestDb,
    adjust: impl FnOnce(&mut sluice_core::config::RawConfig),
) -> sluice::server::ServerHandle {
    let config = test_config(&db.name, adjust);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    sluice::server::start(config, db.store.clone(), listener, false)
        .await
        .expect("server starts")
}
