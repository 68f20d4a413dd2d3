//! The CLI's shared plumbing: finding and loading the config, logging, and the small
//! commands (`config check`, `db init`, `serve`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use sluice_connectors::mongo::IndexOutcome;
use sluice_connectors::Store;
use sluice_core::config::{self, Config, LogSection};
use sluice_core::ConfigError;

/// The default config file name looked for in the working directory.
pub const DEFAULT_CONFIG_FILE: &str = "sluice.toml";

/// `--config` (or `SLUICE_CONFIG`) when given; else `./sluice.toml` when present; else
/// none (embedded defaults).
pub fn config_path(explicit: Option<PathBuf>) -> Option<PathBuf> {
    explicit.or_else(|| {
        let p = PathBuf::from(DEFAULT_CONFIG_FILE);
        p.exists().then_some(p)
    })
}

pub fn load_config(path: Option<&Path>) -> Result<Config, ConfigError> {
    config::load(path, &|k| std::env::var(k).ok())
}

/// Logs go to stderr, as text or JSON lines; `RUST_LOG` overrides the configured level.
pub fn init_tracing(log: &LogSection) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if log.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// `sluice config check`: validates and prints the effective config (secrets redacted).
pub fn config_check(path: Option<&Path>) -> Result<(), ConfigError> {
    let config = load_config(path)?;
    let origin = path.map_or("embedded defaults".to_string(), |p| p.display().to_string());
    println!("# {origin}: valid");
    for w in &config.warnings {
        println!("# warning: {w}");
    }
    print!("{}", config.redacted_toml());
    Ok(())
}

/// `sluice db init`: creates collections and indexes, prints what it did.
pub async fn db_init(config: &Config) -> anyhow::Result<Store> {
    let store = Store::connect(config)
        .await
        .with_context(|| format!("database `{}`", config.database))?;
    let report = store.init().await?;
    for c in &report.created_collections {
        println!("created collection {c}");
    }
    for (coll, name, outcome) in &report.indexes {
        match outcome {
            IndexOutcome::Created => println!("created index {coll}.{name}"),
            IndexOutcome::Exists(_) => {}
            IndexOutcome::Skipped(_) => {}
        }
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    println!(
        "database `{}` ready: {} collections created, {} indexes created, {} already present",
        config.database,
        report.created_collections.len(),
        report.created_indexes(),
        report
            .indexes
            .iter()
            .filter(|(_, _, o)| matches!(o, IndexOutcome::Exists(_)))
            .count()
    );
    Ok(store)
}

/// `sluice serve`: init, then serve until SIGTERM / Ctrl-C.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let store = db_init(&config).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let handle = crate::server::start(config, store, listener, true).await?;
    tracing::info!(addr = %handle.addr, "sluice serving");
    handle.wait().await;
    Ok(())
}
