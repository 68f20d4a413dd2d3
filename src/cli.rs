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

/// Opens the export destination: `override_url` (from `--dest`) or the config's.
pub async fn open_destination(
    config: &Config,
    override_url: Option<&str>,
) -> anyhow::Result<sluice_connectors::objstore::ObjectStore> {
    use sluice_connectors::objstore::{LocalDir, ObjectStore, S3Settings, S3Store};
    use sluice_core::config::Destination;
    let destination = match override_url {
        Some(url) => {
            Destination::parse(url).map_err(|e| anyhow::anyhow!("--dest: expected {e}"))?
        }
        None => config.destination.clone(),
    };
    Ok(match destination {
        Destination::Local(path) => ObjectStore::Local(LocalDir::new(path)),
        Destination::S3 { bucket, prefix } => {
            let s3 = &config.s3;
            ObjectStore::S3(
                S3Store::connect(&S3Settings {
                    bucket,
                    prefix,
                    endpoint: s3.endpoint.clone(),
                    region: s3.region.clone(),
                    access_key: s3.access_key.expose().to_string(),
                    secret_key: s3.secret_key.expose().to_string(),
                    path_style: s3.path_style,
                })
                .await?,
            )
        }
    })
}

/// Prints export progress on stderr every half second until `done` resolves.
pub fn spawn_progress(
    progress: std::sync::Arc<sluice_jobs::export::Progress>,
) -> tokio::task::JoinHandle<()> {
    use std::io::{IsTerminal, Write};
    use std::sync::atomic::Ordering::Relaxed;
    let tty = std::io::stderr().is_terminal();
    let started = std::time::Instant::now();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(if tty {
            500
        } else {
            10_000
        }));
        tick.tick().await;
        loop {
            tick.tick().await;
            let rows = progress.rows_read.load(Relaxed);
            let bytes = progress.bytes_uploaded.load(Relaxed);
            let secs = started.elapsed().as_secs_f64().max(0.001);
            let line = format!(
                "  {rows} rows read, {:.1} MB uploaded, {:.0} rows/s",
                bytes as f64 / 1e6,
                rows as f64 / secs
            );
            let mut err = std::io::stderr();
            if tty {
                let _ = write!(err, "\r{line}   ");
            } else {
                let _ = writeln!(err, "{line}");
            }
            let _ = err.flush();
        }
    })
}

/// `sluice export run`: one export with a progress display and a summary.
pub async fn export_run(
    config: &Config,
    kind: sluice_core::model::ExportJobType,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
    dest: Option<&str>,
) -> anyhow::Result<sluice_jobs::export::ExportSummary> {
    use sluice_jobs::export::{run_export, ExportContext, ExportRequest};
    let store = Store::connect(config).await?;
    store.init().await?;
    let destination = open_destination(config, dest).await?;
    let yesterday = chrono::Utc::now().date_naive() - chrono::Days::new(1);
    let from = from.or(to).unwrap_or(yesterday);
    let to = to.unwrap_or(from);
    let ctx = ExportContext::new(store, destination);
    let request = ExportRequest {
        kind,
        from,
        to,
        archive_after_days: config.archive_after_days,
        archive_settle: sluice_jobs::export::DEFAULT_ARCHIVE_SETTLE,
    };
    let ticker = spawn_progress(ctx.progress.clone());
    let result = run_export(&ctx, &request).await;
    ticker.abort();
    eprintln!();
    let summary = result?;
    println!(
        "export {} {}: {} rows in {} files, {:.1} MB, {:.1} s -> {}",
        summary.job_id,
        summary.kind,
        summary.rows,
        summary
            .partitions
            .iter()
            .map(|p| p.files.len())
            .sum::<usize>(),
        summary.bytes as f64 / 1e6,
        summary.elapsed.as_secs_f64(),
        summary.destination
    );
    for p in &summary.partitions {
        println!(
            "  {:<32} {:>8} rows {:>3} files",
            p.prefix,
            p.rows,
            p.files.len()
        );
    }
    if summary.deleted > 0 {
        println!(
            "  archived and deleted {} events from MongoDB",
            summary.deleted
        );
    }
    Ok(summary)
}

/// `sluice configs validate|apply DIR`: checks (and stores) every config file in a folder.
pub async fn configs_command(config: &Config, dir: &Path, apply: bool) -> anyhow::Result<()> {
    let (valid, errors) = sluice_jobs::configs::validate_dir(dir, &|k| std::env::var(k).ok())
        .with_context(|| format!("cannot read `{}`", dir.display()))?;
    for e in &errors {
        eprintln!("error: {e}");
    }
    for v in &valid {
        println!(
            "ok    {} ({} {}, {} fields{})",
            v.path.display(),
            v.connector.kind,
            v.connector.endpoint.text,
            v.connector.fields.len(),
            v.connector
                .schedule
                .as_ref()
                .map(|s| format!(", schedule `{s}`"))
                .unwrap_or_default()
        );
    }
    anyhow::ensure!(
        errors.is_empty(),
        "{} invalid config file(s); nothing applied",
        errors.len()
    );
    if apply {
        let store = Store::connect(config).await?;
        store.init().await?;
        for v in &valid {
            let created = sluice_jobs::configs::apply(&store, &v.file).await?;
            println!(
                "{} {}",
                if created { "created" } else { "updated" },
                v.file.name
            );
        }
    }
    Ok(())
}

/// `sluice import run NAME`: runs an IMPORT config (or pushes an EXPORT config).
pub async fn import_run(config: &Config, name: &str, dry_run: bool) -> anyhow::Result<()> {
    use sluice_jobs::import::{run_import, run_push, ImportError, ImportOptions};
    use std::sync::atomic::Ordering::Relaxed;
    let store = Store::connect(config).await?;
    store.init().await?;
    let options = ImportOptions {
        dry_run,
        ..Default::default()
    };
    let progress = options.progress.clone();
    let ticker = tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        tick.tick().await;
        loop {
            tick.tick().await;
            eprintln!(
                "  {} pages, {} records, {} upserted, {} failed mapping",
                progress.pages.load(Relaxed),
                progress.records.load(Relaxed),
                progress.upserted.load(Relaxed),
                progress.failed.load(Relaxed)
            );
        }
    });
    let result = run_import(&store, name, &options).await;
    ticker.abort();
    let summary = match result {
        Err(ImportError::WrongType { .. }) if !dry_run => {
            let s = run_push(&store, name, &options).await?;
            println!(
                "push {}: {} read, {} sent in {} requests, {} failed mapping",
                s.name, s.read, s.sent, s.requests, s.failed
            );
            return Ok(());
        }
        other => other?,
    };
    if dry_run {
        println!("dry run of {} (nothing written):", summary.name);
        for r in &summary.preview {
            println!("  {r}");
        }
    }
    println!(
        "import {} {}: {} pages, {} records, {} inserted, {} updated, {} failed mapping, {} requests ({} retries), {:.1} s{}",
        summary.name,
        if summary.completed { "completed" } else if dry_run { "checked" } else { "interrupted" },
        summary.pages,
        summary.fetched,
        summary.inserted,
        summary.updated,
        summary.failed,
        summary.http.requests,
        summary.http.retries,
        summary.elapsed_ms as f64 / 1000.0,
        if summary.resumed { " (resumed)" } else { "" }
    );
    for s in summary.samples.iter().take(5) {
        println!("  rejected: {} in {}", s.reason, s.record);
    }
    if let Some(note) = &summary.stopped_early {
        println!("  note: {note}");
    }
    Ok(())
}
