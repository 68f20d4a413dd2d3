//! The CLI's shared plumbing: finding and loading the config, logging, and the small
//! commands (`config check`, `db init`, `serve`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use sluice_connectors::mongo::IndexOutcome;
use sluice_connectors::Store;
use sluice_core::config::{self, Config, LogSection};
use sluice_core::{counted, ConfigError};

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
/// Text is coloured only on a terminal (a file or a log collector gets plain text).
pub fn init_tracing(log: &LogSection) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if log.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// `sluice config check`: validates and prints the effective config (secrets redacted).
/// With `load_files`, the files it names are loaded too, as `serve` and its exports load
/// them: the plugins of `tracking_transforms` and `export_transforms`, and the GeoIP
/// database.
pub fn config_check(path: Option<&Path>, load_files: bool) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let mut warnings = config.warnings.clone();
    warnings.extend(compile_cache_unmade(&config));
    if load_files {
        crate::server::Loaded::load(&config)?;
        load_plugins(&config, &config.plugins.export_plugins())?;
        warnings.extend(stray_plugin_configs(&config));
    }
    let origin = path.map_or("embedded defaults".to_string(), |p| p.display().to_string());
    println!("# {origin}: valid");
    for w in &warnings {
        println!("# warning: {w}");
    }
    print!("{}", config.redacted_toml());
    Ok(())
}

/// `[plugins.config.NAME]` sections that name no plugin: none installed under that name
/// in `plugins.dir` and none in a chain. Most likely a typo (`contact_clean` for
/// `contact-clean`), which would otherwise leave the plugin running with `{}`.
pub fn stray_plugin_configs(config: &Config) -> Vec<String> {
    let dir = Path::new(&config.plugins.dir);
    let exported = config.plugins.export_plugins();
    let chained = |name: &str| {
        config
            .plugins
            .tracking_transforms
            .iter()
            .chain(&exported)
            .any(|n| n == name)
    };
    let mut installed: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| {
                    let path = e.ok()?.path();
                    (path.extension()? == "toml")
                        .then(|| path.file_stem()?.to_str().map(str::to_string))?
                })
                .collect()
        })
        .unwrap_or_default();
    installed.sort();
    let known = if installed.is_empty() {
        "none".to_string()
    } else {
        installed.join(", ")
    };
    config
        .plugin_configs
        .0
        .keys()
        .filter(|name| !chained(name) && !installed.iter().any(|i| i == *name))
        .map(|name| {
            format!(
                "[plugins.config.{name}] names no plugin: none is installed under that name in `{}` and no chain names it (a typo? installed: {known})",
                dir.display(),
            )
        })
        .collect()
}

/// `sluice db init`: creates collections and indexes, prints what it did.
pub async fn db_init(config: &Config) -> anyhow::Result<Store> {
    init_store(config, false).await
}

/// `serve`'s store: while MongoDB does not answer (down, restarting, not yet reachable)
/// it is tried again, from 1 s apart up to 30 s, each try logged, until it answers or the
/// process is told to stop; anything else (a refused login, a bad URI) ends `serve` at
/// once. A supervisor's restart back-off would otherwise add to the outage.
async fn wait_for_store(config: &Config) -> anyhow::Result<Store> {
    let mut wait = std::time::Duration::from_secs(1);
    let stop = crate::server::shutdown_signal();
    tokio::pin!(stop);
    for attempt in 0u64.. {
        let tried = tokio::select! {
            tried = init_store(config, true) => tried,
            _ = &mut stop => anyhow::bail!("stopped while waiting for MongoDB"),
        };
        match tried {
            Ok(store) => return Ok(store),
            Err(e) if unreachable_store(&e) => {
                // The driver's description of each server says why it did not answer (a
                // refused connection, a certificate, a name that does not resolve: a
                // typo waits for ever too): in full on the first try and every tenth.
                let said = if attempt % 10 == 0 {
                    format!("{e:#}")
                } else {
                    concise_store_error(&e)
                };
                tracing::warn!(
                    retry_in_seconds = wait.as_secs(),
                    "MongoDB does not answer yet; serve waits for it: {said}"
                );
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut stop => anyhow::bail!("stopped while waiting for MongoDB"),
                }
                wait = (wait * 2).min(std::time::Duration::from_secs(30));
            }
            Err(e) => return Err(e),
        }
    }
    unreachable!("tries are counted without end")
}

/// Whether `e` says MongoDB could not be reached (or answered as a server does while it
/// starts), not that it refused what was asked.
fn unreachable_store(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<sluice_connectors::StoreError>()
            .is_some_and(|s| s.is_transient())
    })
}

/// A store error without the driver's description of every server it knows of (its
/// topology, printed once per cause), which says nothing more than "no server answered".
fn concise_store_error(e: &anyhow::Error) -> String {
    let text = format!("{e:#}");
    match text
        .find(", Topology: ")
        .or_else(|| text.find(". Topology: "))
    {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

/// Connects to the configured database; an error names it (a typo in its name, or the
/// wrong deployment, shows at once).
async fn connect_named(config: &Config) -> anyhow::Result<Store> {
    Store::connect(config)
        .await
        .with_context(|| format!("database `{}`", config.database))
}

/// Connects and creates what is missing. What was done is printed (`db init`, the demo)
/// or, in `serve`, logged, so a JSON log stays JSON lines.
async fn init_store(config: &Config, log: bool) -> anyhow::Result<Store> {
    let store = connect_named(config).await?;
    let report = store.init().await?;
    let mut done: Vec<String> = report
        .created_collections
        .iter()
        .map(|c| format!("created collection {c}"))
        .collect();
    for (coll, name, why) in &report.dropped_indexes {
        done.push(format!("dropped index {coll}.{name}: {why}"));
    }
    for (coll, name, outcome) in &report.indexes {
        if let IndexOutcome::Created = outcome {
            done.push(format!("created index {coll}.{name}"));
        }
    }
    let summary = format!(
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
    if log {
        for line in &done {
            tracing::info!("{line}");
        }
        for w in &report.warnings {
            tracing::warn!("{w}");
        }
        tracing::info!("{summary}");
    } else {
        for line in &done {
            println!("{line}");
        }
        for w in &report.warnings {
            eprintln!("warning: {w}");
        }
        println!("{summary}");
    }
    Ok(store)
}

/// `sluice db prune-ledger`: deletes the ledger's claims of archived events before
/// `before`, printing progress; with `dry_run`, only counts them.
pub async fn db_prune_ledger(
    config: &Config,
    before: chrono::NaiveDate,
    dry_run: bool,
) -> anyhow::Result<()> {
    use sluice_connectors::mongo::ledger;
    let store = connect_named(config).await?;
    let cutoff = sluice_jobs::export::day_start(before);
    let total = ledger::count_archived_claims(&store, cutoff).await?;
    if dry_run || total == 0 {
        println!(
            "{total} claims of archived events before {before} {}",
            if dry_run {
                "would be deleted (dry run)"
            } else {
                "to delete"
            }
        );
        return Ok(());
    }
    let done = ledger::prune_archived_claims(&store, cutoff, |p| {
        eprintln!("deleted {} of {total} claims", p.deleted);
    })
    .await?;
    println!(
        "deleted {} claims of archived events before {before}; resends of those events will be stored again",
        done.deleted
    );
    if done.kept > 0 {
        println!(
            "kept {} claims marked archived whose events are still in `events` (an ARCHIVE stopped before deleting them, or running): the next ARCHIVE deletes those events, and a later prune their claims",
            done.kept
        );
    }
    Ok(())
}

/// `sluice db claim-events`: gives the events another writer stored dedupe claims,
/// printing progress.
pub async fn db_claim_events(config: &Config) -> anyhow::Result<()> {
    let store = connect_named(config).await?;
    let done = sluice_connectors::mongo::ledger::claim_stored_events(&store, |p| {
        eprintln!(
            "read {} events: {} claimed now, {} claimed before",
            p.read, p.claimed, p.already
        );
    })
    .await?;
    println!(
        "{} events read: {} claimed now, {} claimed before; a resend of any of them is answered duplicate",
        done.read, done.claimed, done.already
    );
    if done.skipped > 0 {
        println!(
            "{} events have no eventId as text or no timestamp as a date, and no claim: a resend of such an event is stored anew (see docs/operations.md, \"Adopting an existing database\")",
            done.skipped
        );
    }
    Ok(())
}

/// `sluice db dead-letters`: the kept dead letters by pipeline and plugin.
pub async fn db_dead_letters(config: &Config) -> anyhow::Result<()> {
    let store = connect_named(config).await?;
    let groups = sluice_connectors::mongo::dead_letter_groups(&store).await?;
    if groups.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    println!("pipeline\tplugin\tletters\tfirst seen\tlast seen");
    let day = |t: bson::DateTime| t.try_to_rfc3339_string().unwrap_or_default();
    for g in &groups {
        println!(
            "{}\t{}\t{}\t{}\t{}",
            g.pipeline,
            g.plugin,
            g.letters,
            day(g.first_seen),
            day(g.last_seen)
        );
    }
    Ok(())
}

/// `sluice db purge-dead-letters`: deletes one pipeline's dead letters (those last seen
/// before `before`, when given).
pub async fn db_purge_dead_letters(
    config: &Config,
    pipeline: &str,
    before: Option<chrono::NaiveDate>,
    dry_run: bool,
) -> anyhow::Result<()> {
    let store = connect_named(config).await?;
    let cutoff = before.map(sluice_jobs::export::day_start);
    let which = match before {
        Some(d) => format!("dead letters of `{pipeline}` last seen before {d}"),
        None => format!("dead letters of `{pipeline}`"),
    };
    let n = sluice_connectors::mongo::purge_dead_letters(&store, pipeline, cutoff, dry_run).await?;
    if dry_run {
        println!("{n} {which} would be deleted (dry run)");
    } else {
        println!("deleted {n} {which}");
    }
    if n == 0 && !dry_run {
        let any =
            sluice_connectors::mongo::purge_dead_letters(&store, pipeline, None, true).await?;
        if any == 0 {
            eprintln!(
                "note: no dead letters of pipeline `{pipeline}`; `sluice db dead-letters` lists the pipelines that have some"
            );
        }
    }
    Ok(())
}

/// `sluice db check`: compares the session and visitor aggregates with the events they
/// count, printing progress on stderr and what differs on stdout; an error (exit 1) when
/// anything does.
pub async fn db_check(
    config: &Config,
    settle: std::time::Duration,
    show: usize,
) -> anyhow::Result<()> {
    use sluice_connectors::mongo::check::{self, CheckOptions, Mismatch, Stage};
    use sluice_connectors::mongo::ledger;
    let store = connect_named(config).await?;
    let day_after = sluice_jobs::history::latest_archived_day(&store)
        .await?
        .and_then(|d| d.succ_opt())
        .map(sluice_jobs::export::day_start);
    let claim = ledger::latest_archived_claim(&store)
        .await?
        .map(|t| bson::DateTime::from_millis(t.timestamp_millis() + 1));
    let options = CheckOptions {
        archived_before: day_after.max(claim),
        settle,
        ..CheckOptions::default()
    };
    let started = std::time::Instant::now();
    // A line per stage every few seconds at most: the check may read millions of claims,
    // and stderr is often a log file.
    let mut printed: Option<(Stage, std::time::Instant)> = None;
    let report = check::check(&store, &options, |stage, n| {
        let now = std::time::Instant::now();
        if stage != Stage::Settling
            && printed.is_some_and(|(s, at)| s == stage && now - at < PROGRESS_EVERY)
        {
            return;
        }
        printed = Some((stage, now));
        match stage {
            Stage::Claims => eprintln!("ledger: {n} claims read"),
            // Read so far, those skipped as archived included (the summary tells them apart).
            Stage::Sessions => eprintln!("sessions: {n} read"),
            Stage::Visitors => eprintln!("visitors: {n} read"),
            Stage::Settling => eprintln!(
                "{n} sessions and visitors differ: looking again in {} s",
                settle.as_secs()
            ),
        }
    })
    .await?;
    println!(
        "checked {} sessions and {} visitors against {} events and {} ledger claims in {:.1} s",
        report.sessions,
        report.visitors,
        report.events,
        report.claims,
        started.elapsed().as_secs_f64()
    );
    if let Some(h) = options.archived_before {
        println!(
            "skipped {} sessions and {} visitors with events before {} (archived: their aggregates count events `events` no longer holds)",
            report.archived_sessions,
            report.archived_visitors,
            h.try_to_rfc3339_string().unwrap_or_default()
        );
    }
    if !report.in_doubt.is_empty() {
        println!(
            "claims without their event: {} (counted in the aggregates, never stored in `events`: an insert lost, or a request answered 503 and not sent again); {} sessions and {} visitors differ by exactly these",
            report.in_doubt.len(),
            report.explained_sessions,
            report.explained_visitors
        );
        for claim in report.in_doubt.iter().take(show) {
            let time = |t: Option<bson::DateTime>| {
                t.and_then(|t| t.try_to_rfc3339_string().ok())
                    .unwrap_or_else(|| "?".into())
            };
            println!(
                "  event {} at {} (visitor {}, session {}), claimed {}",
                claim.event_id,
                time(claim.timestamp),
                claim.user_id.as_deref().unwrap_or("?"),
                claim.session_id.as_deref().unwrap_or("?"),
                time(claim.claimed_at)
            );
        }
    }
    let list = |what: &str, found: &[Mismatch]| {
        if found.is_empty() {
            return;
        }
        println!(
            "{} {what} differ (stored / recomputed from events):",
            found.len()
        );
        for m in found.iter().take(show) {
            let fields: Vec<String> = m
                .differences
                .iter()
                .map(|d| format!("{} {} / {}", d.field, d.stored, d.recomputed))
                .collect();
            println!("  {}: {}", m.id, fields.join("; "));
        }
    };
    list("sessions", &report.sessions_differ);
    list("visitors", &report.visitors_differ);
    for u in &report.unreadable_events {
        println!("unreadable: {u}");
    }
    if report.consistent() {
        println!("aggregates match the events");
        Ok(())
    } else {
        anyhow::bail!(
            "{} sessions and {} visitors differ from their events",
            report.sessions_differ.len(),
            report.visitors_differ.len()
        )
    }
}

/// `sluice serve`: init, then serve until SIGTERM / Ctrl-C.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    for w in config
        .warnings
        .iter()
        .cloned()
        .chain(stray_plugin_configs(&config))
    {
        tracing::warn!("{w}");
    }
    // Files first: a missing plugin or GeoIP database stops `serve` before it touches the
    // database or claims a scheduled run.
    // A plugin or GeoIP database that does not load is a config that does not load.
    let loaded = crate::server::Loaded::load(&config)
        .map_err(|e| anyhow::Error::new(InvalidConfigs(format!("{e:#}"))))?;
    crate::server::mark_process_started();
    // While it waits for MongoDB, `ops_listen` already answers: alive, not ready, with the
    // process metrics, so a waiting replica is told from a dead one.
    let starting = match config.ops_listen {
        Some(at) => Some(crate::server::serve_starting(at).await?),
        None => None,
    };
    let store = match wait_for_store(&config).await {
        Ok(store) => store,
        Err(e) => {
            if let Some(s) = starting {
                s.stop().await;
            }
            return Err(e);
        }
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let config = std::sync::Arc::new(config);
    let runner = std::sync::Arc::new(crate::engine::EngineRunner {
        config: config.clone(),
        store: store.clone(),
    });
    let scheduler = if config.scheduler.enabled {
        let options = sluice_jobs::schedule::SchedulerOptions {
            lease: std::time::Duration::from_secs(config.scheduler.lease_seconds),
            reload_every: std::time::Duration::from_secs(config.scheduler.reload_seconds),
            max_concurrent_runs: config.scheduler.max_concurrent_runs,
            ..Default::default()
        };
        tracing::info!(instance = %options.instance, "scheduler started");
        Some(
            sluice_jobs::schedule::Scheduler::start(
                store.clone(),
                runner,
                crate::engine::job_source(config.clone(), store.clone()),
                options,
            )
            .await
            .map_err(|e| anyhow::anyhow!("scheduler: {e}"))?,
        )
    } else {
        None
    };
    // A replica whose export destination refuses would still claim scheduled exports
    // and fail them: it says so at once (it starts all the same; the check is S3's).
    // In the background: serving does not wait for S3.
    if scheduler.is_some() && !config.schedules.is_empty() {
        let config = config.clone();
        tokio::spawn(async move {
            let checked = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                open_destination(&config, None).await?.check().await?;
                anyhow::Ok(())
            })
            .await;
            let problem = match checked {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some("it did not answer within 10 s".to_string()),
            };
            if let Some(problem) = problem {
                tracing::warn!(
                    destination = %config.destination,
                    "the export destination refuses this replica: its scheduled exports will fail until that is fixed: {problem}"
                );
            }
        });
    }
    // The jobs' gauges, read from the store as every replica reads them.
    let gauges = scheduler.as_ref().map(|_| {
        let (config, store) = (config.clone(), store.clone());
        tokio::spawn(async move {
            let every = crate::engine::job_gauges_every(&config);
            loop {
                if let Err(e) = crate::engine::publish_job_gauges(&config, &store).await {
                    sluice_core::metrics::count_background_error("job_gauges", 1);
                    tracing::warn!(error = %e, "could not read the scheduled jobs' state for their gauges");
                }
                tokio::time::sleep(every).await;
            }
        })
    });
    let store_for_shutdown = store.clone();
    // The ops address goes to the server now (it binds it again at once).
    if let Some(s) = starting {
        s.stop().await;
    }
    let handle =
        match crate::server::start_loaded((*config).clone(), store, listener, true, loaded).await {
            Ok(h) => h,
            Err(e) => {
                // Runs the scheduler may have claimed already are handed back.
                if let Some(s) = &scheduler {
                    s.shutdown().await;
                }
                return Err(e);
            }
        };
    match handle.ops_addr {
        Some(ops) => {
            tracing::info!(addr = %handle.addr, ops_addr = %ops, "sluice serving (probes and metrics also on ops_addr)")
        }
        None => tracing::info!(addr = %handle.addr, "sluice serving"),
    }
    // Imports and exports in flight are stopped with the process and recorded
    // (imports INTERRUPTED with their checkpoint's progress, exports FAILED), not left
    // RUNNING. Each is listed while it runs, so the lists are read before the runs stop.
    let in_flight = || {
        (
            crate::engine::imports_in_flight(),
            sluice_jobs::history::exports_in_flight(),
        )
    };
    // On the signal the scheduler stops taking work at once, while the HTTP server drains.
    let seen_at_signal = std::sync::Arc::new(std::sync::Mutex::new(None));
    let stopping = scheduler.clone().map(|s| {
        let seen = seen_at_signal.clone();
        tokio::spawn(async move {
            crate::server::shutdown_signal().await;
            // Triggers first: nothing starts after the lists are read.
            s.stop_triggers().await;
            *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(in_flight());
            s.stop_runs().await;
        })
    });
    handle.wait().await;
    if let Some(g) = gauges {
        g.abort();
    }
    if let Some(s) = &scheduler {
        // Nothing starts after the lists are read.
        s.stop_triggers().await;
    }
    let (mut interrupted, mut exports) = in_flight();
    if let Some((i, e)) = seen_at_signal
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take()
    {
        interrupted.extend(i);
        exports.extend(e);
    }
    interrupted.sort();
    interrupted.dedup();
    exports.sort();
    exports.dedup();
    if let Some(s) = &scheduler {
        s.stop_runs().await;
    }
    if let Some(t) = stopping {
        t.abort();
    }
    // Runs started through the admin API end their records at once (FAILED, "stopped by
    // a shutdown"), so their job is free without waiting out their lease.
    let manual = sluice_jobs::schedule::stop_manual_runs(
        &store_for_shutdown,
        std::time::Duration::from_secs(5),
    )
    .await;
    if manual > 0 {
        tracing::warn!(
            runs = manual,
            "runs started by hand were stopped by the shutdown"
        );
    }
    record_stopped(&store_for_shutdown, &interrupted, &exports).await;
    if let Some(s) = &scheduler {
        // Handed back only once recorded: another replica takes them over at once,
        // without waiting for their lease, and its run is not the one recorded stopped.
        s.hand_back().await;
    }
    Ok(())
}

/// Records what a stop by signal cut short: imports INTERRUPTED with their checkpoint's
/// progress (the next run resumes there), exports FAILED rather than RUNNING until the
/// next export presumes them dead (their staging is removed by the next export; an
/// ARCHIVE's pending day is finished or undone by the next archive, which need not wait
/// for the stopped one's lock to lapse).
async fn record_stopped(store: &Store, imports: &[String], exports: &[String]) {
    if !imports.is_empty() {
        match sluice_jobs::import::mark_interrupted(store, imports).await {
            Ok(n) => {
                tracing::warn!(configs = ?imports, marked_now = n, "imports and pushes interrupted by a stop: each is recorded INTERRUPTED in import_runs (by itself, or now: `marked_now`), and its next run goes on from its checkpoint")
            }
            Err(e) => tracing::error!(error = %e, "could not record the interrupted imports"),
        }
    }
    if !exports.is_empty() {
        // A partition being published is completed or undone first, never left half-way.
        if !sluice_jobs::export::wait_for_publishes(std::time::Duration::from_secs(60)).await {
            tracing::error!("a partition was still being published after 60 s; its export's next run of the window repairs it");
        }
        match sluice_jobs::history::fail_stopped_runs(store, exports).await {
            Ok(n) => {
                tracing::warn!(exports = ?exports, marked_now = n, "exports interrupted by a stop: each is recorded FAILED in export_jobs (by itself, or now: `marked_now`); a scheduled one's windows are exported again by its next run, one run by hand must be run again")
            }
            Err(e) => tracing::error!(error = %e, "could not record the interrupted exports"),
        }
        if let Err(e) = sluice_jobs::export::release_archive_lock(store, exports).await {
            tracing::error!(error = %e, "could not hand back the archive lock");
        }
    }
}

/// Runs a job in the foreground (`export run`, `jobs run`) until it ends or Ctrl-C /
/// SIGTERM arrives. A signal stops the work at once and records it the way `serve` records
/// what a shutdown stops (see [`record_stopped`]); the answer is then the error saying so.
async fn until_signal<F: std::future::Future>(store: &Store, work: F) -> Result<F::Output, String> {
    let mut work = Box::pin(work);
    tokio::select! {
        out = &mut work => Ok(out),
        _ = crate::server::shutdown_signal() => {
            let imports = crate::engine::imports_in_flight();
            let exports = sluice_jobs::history::exports_in_flight();
            drop(work);
            record_stopped(store, &imports, &exports).await;
            Err(if imports.is_empty() {
                "stopped by a signal; rerun it".to_string()
            } else {
                "stopped by a signal; the next run resumes from the last checkpoint".to_string()
            })
        }
    }
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
                    checksums: s3.checksums,
                    server_side_encryption: s3.server_side_encryption.clone(),
                    sse_kms_key_id: s3.sse_kms_key_id.clone(),
                    storage_class: s3.storage_class.clone(),
                    expected_bucket_owner: s3.expected_bucket_owner.clone(),
                })
                .await?,
            )
        }
    })
}

/// [`ObjectStore::url`](sluice_connectors::objstore::ObjectStore::url) of the configured
/// destination's root, without connecting to it (a relative folder is read from the
/// working folder, as every command reads it).
pub fn destination_url(config: &Config) -> String {
    use sluice_connectors::objstore::{LocalDir, S3Store};
    match &config.destination {
        sluice_core::config::Destination::Local(path) => LocalDir::new(path).url(""),
        sluice_core::config::Destination::S3 { bucket, prefix } => {
            S3Store::url_of(bucket, prefix, "")
        }
    }
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
            let encoded = progress.rows_written.load(Relaxed);
            let bytes = progress.bytes_uploaded.load(Relaxed);
            let deleted = progress.rows_deleted.load(Relaxed);
            let secs = started.elapsed().as_secs_f64().max(0.001);
            // Parts are uploaded as they close (up to 128 MB each), so the MB lag the rows.
            let mut line = format!(
                "  {rows} rows read, {encoded} encoded, {:.1} MB in uploaded parts, {:.0} rows/s",
                bytes as f64 / 1e6,
                rows as f64 / secs
            );
            if deleted > 0 {
                line.push_str(&format!(", {deleted} archived events deleted"));
            }
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

/// Prints import progress on stderr until aborted: checked every two seconds, a line when
/// it moved, and while it does not (a slow page, a long retry wait) one every
/// [`QUIET_PROGRESS`] saying for how long, rather than the same line again and again.
pub fn spawn_import_progress(
    progress: std::sync::Arc<sluice_jobs::import::ImportProgress>,
) -> tokio::task::JoinHandle<()> {
    use std::sync::atomic::Ordering::Relaxed;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        tick.tick().await;
        let mut last = None;
        let mut moved = std::time::Instant::now();
        let mut printed = moved;
        let mut shown_wait = None;
        loop {
            tick.tick().await;
            // A wait before a retry is said once, when it begins: a long `Retry-After`
            // otherwise reads as a hung run.
            let waiting = progress.waits.current();
            if let Some(w) = waiting.as_ref().filter(|w| shown_wait.as_ref() != Some(*w)) {
                if w.wait >= std::time::Duration::from_secs(2) {
                    eprintln!("  {}", waiting_text(w));
                    printed = std::time::Instant::now();
                }
                shown_wait = Some(w.clone());
            }
            let now = [
                progress.pages.load(Relaxed),
                progress.records.load(Relaxed),
                progress.upserted.load(Relaxed),
                progress.failed.load(Relaxed),
            ];
            let line = if progress.pushing.load(Relaxed) {
                format!(
                    "  {} sent in {}, {} failed mapping",
                    counted(now[1], "record"),
                    counted(now[0], "request"),
                    now[3]
                )
            } else {
                format!(
                    "  {}, {}, {} upserted, {} failed mapping",
                    counted(now[0], "page"),
                    counted(now[1], "record"),
                    now[2],
                    now[3]
                )
            };
            if last != Some(now) {
                eprintln!("{line}");
                (last, moved, printed) = (
                    Some(now),
                    std::time::Instant::now(),
                    std::time::Instant::now(),
                );
            } else if printed.elapsed() >= QUIET_PROGRESS {
                let wait = waiting
                    .map(|w| format!("; {}", waiting_text(&w)))
                    .unwrap_or_default();
                eprintln!(
                    "{line}; no progress for {} s{wait}",
                    moved.elapsed().as_secs()
                );
                printed = std::time::Instant::now();
            }
        }
    })
}

/// `waiting 58 s before attempt 2 of 5: 429 Too Many Requests (...)`.
fn waiting_text(w: &sluice_connectors::http::Waiting) -> String {
    let left = w.until.saturating_duration_since(std::time::Instant::now());
    let mut why = sluice_core::model::prefix_within(&w.why, 160).to_string();
    if why.len() < w.why.len() {
        why.push_str("...");
    }
    format!(
        "waiting {} s before attempt {} of {}: {why}",
        left.as_secs_f64().ceil() as u64,
        w.attempt,
        w.attempts
    )
}

/// Stops a progress printer, waiting until it has: aborting alone lets a line it is
/// printing on another thread land after the summary.
pub async fn stop_ticker(ticker: tokio::task::JoinHandle<()>) {
    ticker.abort();
    let _ = ticker.await;
}

/// How often `db check` prints where it is, per stage.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// How often an import that makes no progress says so.
const QUIET_PROGRESS: std::time::Duration = std::time::Duration::from_secs(30);

/// `export run` / `jobs run` arguments: ARCHIVE and USER_DATA have no window, so a
/// `--from` / `--to` given to them would be silently ignored: refuse it instead.
pub fn check_export_window(
    kind: sluice_core::model::ExportJobType,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
) -> anyhow::Result<()> {
    use sluice_core::model::ExportJobType;
    let today = chrono::Utc::now().date_naive();
    if let Some(day) = [from, to].into_iter().flatten().find(|d| *d > today) {
        anyhow::bail!(
            "{day} has not begun (today is {today}, UTC): its partition would be published empty and look complete"
        );
    }
    if (from.is_some() || to.is_some())
        && matches!(kind, ExportJobType::Archive | ExportJobType::UserData)
    {
        anyhow::bail!(
            "{} takes no --from / --to: {}",
            kind.as_str(),
            if kind == ExportJobType::Archive {
                "it archives every event older than `archive_after_days`"
            } else {
                "it exports every user profile as of now"
            }
        );
    }
    Ok(())
}

/// `export run --late-days`: only for the kinds that publish late events again, and only
/// to the configured destination, whose partitions the late-day marks track.
pub fn check_late_days(
    kind: sluice_core::model::ExportJobType,
    late_days: bool,
    dest: Option<&str>,
) -> anyhow::Result<()> {
    use sluice_core::model::ExportJobType;
    if !late_days {
        return Ok(());
    }
    if !kind.by_day() {
        anyhow::bail!(
            "--late-days is for event-data and daily-analytics ({} has no late days: {})",
            kind.as_str(),
            if kind == ExportJobType::Archive {
                "it adds an archived day's late events to its partition at its next run"
            } else {
                "it exports every user profile as of now"
            }
        );
    }
    if dest.is_some() {
        anyhow::bail!(
            "--late-days publishes to `export.destination` only: which days still need publishing again is kept for that destination, so a run elsewhere (--dest) would mark them done there"
        );
    }
    Ok(())
}

/// A database without the collection an export reads (`events`; `users` for USER_DATA:
/// a typo in its name, the wrong deployment) would be read as empty, and its partitions
/// published as complete: refused before anything is created there, so an orchestrator
/// sees the failure.
async fn require_export_source(
    config: &Config,
    store: &Store,
    kind: sluice_core::model::ExportJobType,
) -> anyhow::Result<()> {
    use sluice_core::model::collections as c;
    let source = if kind == sluice_core::model::ExportJobType::UserData {
        c::USERS
    } else {
        c::EVENTS
    };
    let collections = store
        .db()
        .list_collection_names()
        .await
        .with_context(|| format!("database `{}`: list its collections", config.database))?;
    if !collections.iter().any(|c| c == source) {
        anyhow::bail!(
            "database `{}` holds no `{source}` collection, so there is nothing to export (is `mongodb.database` the platform's?); nothing was created there. A new deployment runs `sluice db init` (or `sluice serve`) first",
            config.database
        );
    }
    Ok(())
}

/// `sluice export run`: one export with a progress display and a summary; with
/// `late_days`, then every day that received events since this kind last published it.
pub async fn export_run(
    config: &Config,
    kind: sluice_core::model::ExportJobType,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
    dest: Option<&str>,
    late_days: bool,
) -> anyhow::Result<sluice_jobs::export::ExportSummary> {
    use sluice_jobs::export::{run_export, ExportContext, ExportRequest};
    let store = connect_named(config).await?;
    require_export_source(config, &store, kind).await?;
    store.init().await?;
    let destination = open_destination(config, dest).await?;
    // An archive elsewhere (`--dest`) waits for the exports' reads of late days where they
    // publish, the configured destination: at its own there are none.
    let late_readers_at = match dest {
        Some(_) if kind == sluice_core::model::ExportJobType::Archive => {
            Some(destination_url(config))
        }
        _ => None,
    };
    let yesterday = store.now().to_chrono().date_naive() - chrono::Days::new(1);
    let from = from.or(to).unwrap_or(yesterday);
    let to = to.unwrap_or(from);
    let mut ctx = ExportContext::new(store.clone(), destination);
    ctx.transforms = load_plugins(config, config.plugins.export_chain(kind))?;
    ctx.keep_replaced = config.keep_replaced_parts;
    ctx.work_dir = config.export_work_dir.clone();
    let request = ExportRequest {
        kind,
        from,
        to,
        archive_after_days: config.archive_after_days,
        archive_settle: sluice_jobs::export::DEFAULT_ARCHIVE_SETTLE,
        scheduled: false,
        late_readers: late_readers(config),
        late_readers_at,
        late: false,
    };
    let ticker = spawn_progress(ctx.progress.clone());
    let result = until_signal(&store, run_export(&ctx, &request)).await;
    stop_ticker(ticker).await;
    eprintln!();
    let summary = result.map_err(anyhow::Error::msg)??;
    print_export_summary(config, &summary, kind, from, to, yesterday);
    // (The days it published are noted as read by `run_export`.)
    if kind.by_day() && dest.is_none() {
        let outside = |d: chrono::NaiveDate| d < from || d > to;
        if late_days {
            publish_late_days_now(config, &ctx, kind, outside).await?;
        } else {
            let pending: Vec<_> =
                sluice_jobs::export::late_days(&ctx, kind, config.archive_after_days)
                    .await?
                    .into_iter()
                    .filter(|d| outside(*d))
                    .collect();
            if !pending.is_empty() {
                println!(
                    "  {} received events after this kind last read {}, or within a minute before (counted late to be safe: a publish of such a day is repeated once, with the same rows if nothing arrived): {}; {}",
                    counted(pending.len() as u64, "day"),
                    if pending.len() == 1 { "it" } else { "them" },
                    listed_days(&pending),
                    if late_readers(config).contains(&kind) {
                        "its schedule publishes them again at its next run, or run this with `--late-days` to publish them now"
                    } else {
                        "no schedule of this kind publishes them again: run this with `--late-days`"
                    }
                );
            }
        }
    }
    Ok(summary)
}

/// `export run --late-days`: publishes again the late days `wanted` keeps, one export
/// each, and prints a line per day; fails when any day failed (after trying every one).
async fn publish_late_days_now(
    config: &Config,
    ctx: &sluice_jobs::export::ExportContext,
    kind: sluice_core::model::ExportJobType,
    wanted: impl Fn(chrono::NaiveDate) -> bool,
) -> anyhow::Result<()> {
    let ticker = spawn_progress(ctx.progress.clone());
    let late = until_signal(
        &ctx.store,
        sluice_jobs::export::publish_late_days(
            ctx,
            kind,
            wanted,
            config.archive_after_days,
            None,
            false,
        ),
    )
    .await;
    stop_ticker(ticker).await;
    let late = late.map_err(anyhow::Error::msg)??;
    if late.published.is_empty() && late.failed.is_empty() {
        println!("  late days: none (no day received events since this kind last published it)");
    }
    for s in &late.published {
        for p in &s.partitions {
            println!(
                "  {:<32} {:>8} rows {:>3} files  (published again: late events; export {})",
                p.prefix,
                p.rows,
                p.files.len(),
                s.job_id
            );
        }
    }
    for (d, why) in &late.failed {
        println!("  {d}: not published again: {why}");
    }
    // The run's headline counts its own window: these days are said in all, apart.
    if !late.published.is_empty() {
        let rows: u64 = late
            .published
            .iter()
            .flat_map(|s| &s.partitions)
            .map(|p| p.rows)
            .sum();
        println!(
            "  late days: {} published again, {}, besides the window above",
            counted(late.published.len() as u64, "day"),
            counted(rows, "row")
        );
    }
    if !late.failed.is_empty() {
        anyhow::bail!(
            "{} with late events could not be published again (listed above); run again to retry {}",
            counted(late.failed.len() as u64, "day"),
            if late.failed.len() == 1 { "it" } else { "them" }
        );
    }
    Ok(())
}

/// Days as `2026-11-01, 2026-11-03`, the first ten and a count of the rest.
fn listed_days(days: &[chrono::NaiveDate]) -> String {
    let mut text = days
        .iter()
        .take(10)
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if days.len() > 10 {
        text.push_str(&format!(" and {} more", days.len() - 10));
    }
    text
}

/// The summary `export run` prints for one export.
fn print_export_summary(
    config: &Config,
    summary: &sluice_jobs::export::ExportSummary,
    kind: sluice_core::model::ExportJobType,
    from: chrono::NaiveDate,
    to: chrono::NaiveDate,
    yesterday: chrono::NaiveDate,
) {
    println!(
        "export {} {}: {} in {}, {:.1} MB, {:.1} s -> {}",
        summary.job_id,
        summary.kind,
        counted(summary.rows, "row"),
        counted(
            summary
                .partitions
                .iter()
                .map(|p| p.files.len() as u64)
                .sum::<u64>(),
            "file"
        ),
        summary.bytes as f64 / 1e6,
        summary.elapsed.as_secs_f64(),
        summary.destination
    );
    for p in &summary.partitions {
        if p.kept {
            // Not "0 rows": the partition readers see still holds what was published.
            println!(
                "  {:<32} kept as published before (this run did not replace it; see the log)",
                p.prefix
            );
            continue;
        }
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
    if summary.skipped > 0 {
        println!(
            "  {} records skipped by a plugin under the skip-batch policy (not written; see the log)",
            summary.skipped
        );
    }
    if summary.rejected > 0 {
        println!(
            "  {} documents could not be rows of the table and were kept in dead_letters (pipeline export:{kind})",
            summary.rejected
        );
    }
    if summary.dead_lettered > 0 {
        println!(
            "  {} failed in a plugin and were kept in dead_letters (pipeline export:{kind})",
            counted(summary.dead_lettered, "record")
        );
    }
    for d in &summary.deferred {
        println!("  not archived yet: {d}");
    }
    if kind == sluice_core::model::ExportJobType::Archive
        && summary.rows == 0
        && summary.deferred.is_empty()
    {
        let cutoff = chrono::Utc::now().date_naive()
            - chrono::Days::new(u64::from(config.archive_after_days));
        println!(
            "  nothing to archive: ARCHIVE takes events of days before {cutoff} (older than `archive_after_days` = {}) stored more than {} s ago",
            config.archive_after_days,
            sluice_jobs::export::DEFAULT_ARCHIVE_SETTLE.as_secs()
        );
    }
    let today = yesterday + chrono::Days::new(1);
    if kind.by_day() && from <= today && today <= to {
        println!(
            "  note: today ({today}) is not over: its partition holds the events so far, with `_SUCCESS` like any other; export it again tomorrow (the schedules export up to yesterday)"
        );
    }
}

/// `sluice configs validate DIR`: checks every config file of a folder (no database) and
/// prints one line per file; fails when any is invalid.
/// With `config` (the `sluice.toml` the configs will run under), the plugins a config's
/// `transforms` name are loaded too, as `configs apply` and every run load them; without
/// (why not), a config naming plugins gets a note saying they were not checked.
pub fn configs_validate(
    dir: &Path,
    allow_missing_env: bool,
    config: Result<&Config, &String>,
) -> anyhow::Result<Vec<sluice_jobs::configs::ValidFile>> {
    // In CI the production secrets are absent: with `allow_missing_env`, an unset
    // `${env:NAME}` stands in as a placeholder and is listed, and everything else is
    // still checked. Set but empty counts as unset (CI systems give a secret a fork may
    // not read as empty).
    let missing = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let env = |k: &str| {
        let set = std::env::var(k).ok();
        let set = set.filter(|v| !(allow_missing_env && v.is_empty()));
        set.or_else(|| {
            allow_missing_env.then(|| {
                missing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(k.to_string());
                format!("unset-{k}")
            })
        })
    };
    let (valid, mut errors) = sluice_jobs::configs::validate_dir(dir, &env)
        .with_context(|| format!("cannot read `{}`", dir.display()))?;
    let valid: Vec<_> = match config {
        Err(why) => {
            for v in valid.iter().filter(|v| !v.file.transforms.is_empty()) {
                eprintln!(
                    "note: {}: `transforms` not checked: {why}",
                    v.path.display()
                );
            }
            valid
        }
        Ok(config) => valid
            .into_iter()
            .filter(|v| match check_config_transforms(config, &v.file) {
                Ok(()) => true,
                Err(e) => {
                    // At the line of `transforms`, as the file's other errors are said.
                    let origin = v.path.display().to_string();
                    let origin = match std::fs::read_to_string(&v.path) {
                        Ok(text) => sluice_core::toml_errors::at_line(&origin, &text, "transforms"),
                        Err(_) => origin,
                    };
                    errors.push(ConfigError::Parse {
                        origin,
                        message: format!("{e:#}"),
                    });
                    false
                }
            })
            .collect(),
    };
    anyhow::ensure!(
        !valid.is_empty() || !errors.is_empty(),
        "no `*.toml` config files in `{}`",
        dir.display()
    );
    for name in missing.into_inner().unwrap_or_else(|p| p.into_inner()) {
        eprintln!("note: `{name}` is not set; checked with a placeholder");
    }
    for e in &errors {
        eprintln!("error: {e}");
    }
    let mut per_file = std::collections::BTreeMap::<String, usize>::new();
    for e in &errors {
        *per_file.entry(e.file()).or_default() += 1;
    }
    for (file, &n) in &per_file {
        if let Some(note) = sluice_core::toml_errors::more_errors_note(file, n) {
            eprintln!("note: {note} (fix these and run again)");
        }
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
        "{} invalid config file(s) ({} error(s))",
        per_file.len(),
        errors.len()
    );
    Ok(valid)
}

/// Config files that did not validate: the process exits 2, as for an invalid
/// `sluice.toml`, whichever command found them.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidConfigs(pub String);

/// `sluice configs apply DIR`: validates the folder, then stores every config (nothing is
/// applied when any file is invalid).
pub async fn configs_apply(config: &Config, dir: &Path) -> anyhow::Result<()> {
    let invalid = |e: anyhow::Error| anyhow::Error::new(InvalidConfigs(format!("{e:#}")));
    let valid = configs_validate(dir, false, Ok(config))
        .map_err(invalid)
        .context("nothing applied")?;
    let store = connect_named(config).await?;
    store.init().await?;
    for v in &valid {
        let note = sluice_jobs::configs::cursor_reading_changed(&store, &v.file).await?;
        let applied = sluice_jobs::configs::apply(&store, &v.file).await?;
        println!("{} {}", applied.as_str(), v.file.name);
        if let Some(note) = note {
            eprintln!("note: {note}");
        }
    }
    Ok(())
}

/// `sluice configs delete NAME`.
pub async fn configs_delete(config: &Config, name: &str) -> anyhow::Result<()> {
    let store = connect_named(config).await?;
    store.init().await?;
    let job = crate::engine::job_name(name);
    let Some(removed) = sluice_jobs::configs::remove(&store, name, &job).await? else {
        anyhow::bail!("no integration config `{name}` is stored");
    };
    let mut also = Vec::new();
    if removed.checkpoint {
        also.push("its interrupted run's checkpoint");
    }
    if removed.saved_token {
        also.push("its saved OAuth refresh token");
    }
    println!(
        "deleted {name}{}; its run history and the data it imported stay (a running `sluice serve` stops scheduling it at its next reload)",
        if also.is_empty() {
            String::new()
        } else {
            format!(", with {}", also.join(" and "))
        }
    );
    Ok(())
}

/// `sluice import reset NAME [--cursor]`.
pub async fn import_reset(config: &Config, name: &str, cursor: bool) -> anyhow::Result<()> {
    let store = connect_named(config).await?;
    store.init().await?;
    let job = crate::engine::job_name(name);
    let report = sluice_jobs::import::reset_import(&store, name, &job, cursor).await?;
    match &report.checkpoint {
        Some((run, pages)) => println!(
            "{name}: dropped the checkpoint of run {run} ({pages} pages committed); the next run starts anew, from the last committed cursor if there is one"
        ),
        None => println!("{name}: no interrupted run to drop"),
    }
    if cursor {
        match &report.cursor {
            Some(was) => println!(
                "{name}: cleared the cursor (was {}); the next run reads everything",
                sluice_jobs::import::cursor_text(was)
            ),
            None => println!("{name}: no cursor to clear"),
        }
    }
    Ok(())
}

/// `sluice import run NAME`: runs an IMPORT config (or pushes an EXPORT config).
/// Fails unless an integration config `name` is stored (`configs apply` stores them).
async fn require_config(store: &Store, name: &str) -> anyhow::Result<()> {
    if sluice_jobs::configs::load(store, name).await?.is_none() {
        anyhow::bail!(
            "no integration config `{name}` is stored (apply it with `sluice configs apply`)"
        );
    }
    Ok(())
}

pub async fn import_run(config: &Config, name: &str, dry_run: bool) -> anyhow::Result<()> {
    use sluice_jobs::import::{run_import, run_push, ImportError, ImportOptions};
    use std::sync::atomic::Ordering::Relaxed;
    let store = connect_named(config).await?;
    store.init().await?;
    // Checked first: a typo, or a plugin that fails to load, must not leave a run record
    // behind.
    require_config(&store, name).await?;
    let transforms = integration_transforms(config, &store, name).await?;
    // A real run is recorded like `jobs run` and holds the job's lease, so a scheduled
    // fire (or another run by hand) of the same config never shares its checkpoint. From
    // here on every path ends the record.
    let run = if dry_run {
        None
    } else {
        let job = crate::engine::job_name(name);
        Some(sluice_jobs::schedule::start_manual_run(&store, &job, "cli").await?)
    };
    let options = ImportOptions {
        dry_run,
        transforms,
        token_key: config.token_key.clone(),
        tracking: config.tracking.clone(),
        ..Default::default()
    };
    // Ctrl-C / SIGTERM: finish the page being written, record the run INTERRUPTED at its
    // checkpoint, and exit; the next run resumes there. A second signal stops at once (a
    // page may take long: a fetch waiting out an API's `Retry-After`), recording the run
    // INTERRUPTED at its last checkpoint.
    let stopper = async {
        crate::server::shutdown_signal().await;
        eprintln!("stopping after the current page (the next run resumes from there); signal again to stop at once");
        options.progress.stop.store(true, Relaxed);
        crate::server::shutdown_signal().await;
    };
    let ticker = spawn_import_progress(options.progress.clone());
    enum Done {
        Imported(Box<sluice_jobs::import::ImportSummary>),
        Pushed(Box<sluice_jobs::import::PushSummary>),
    }
    let work = async {
        match run_import(&store, name, &options).await {
            Err(ImportError::WrongType { .. }) if !dry_run => {
                let s = run_push(&store, name, &options).await?;
                Ok(Done::Pushed(Box::new(s)))
            }
            other => other.map(|s| Done::Imported(Box::new(s))),
        }
    };
    let work = async {
        tokio::select! {
            biased;
            done = work => done,
            () = stopper => {
                // Only a real run holds the job: a dry run must not relabel the record
                // of a run a server is making of the same config.
                if run.is_some() {
                    let _ = sluice_jobs::import::mark_interrupted(&store, &[name.to_string()]).await;
                }
                Err(ImportError::Stopped(
                    "stopped at once by a second signal; the next run resumes from the last checkpoint (a push: from its last saved position, up to a second behind, and sends those batches again with the same Idempotency-Keys)".into(),
                ))
            }
        }
    };
    let result = match &run {
        Some(id) => sluice_jobs::schedule::hold_manual_run(&store, id, work)
            .await
            .unwrap_or_else(|lost| {
                Err(ImportError::Store(sluice_connectors::StoreError::Busy(
                    lost,
                )))
            }),
        None => work.await,
    };
    stop_ticker(ticker).await;
    if let Some(id) = &run {
        let ended = match &result {
            Ok(Done::Imported(s)) if s.completed => crate::engine::import_outcome(s),
            Ok(Done::Imported(s)) => Err(format!("interrupted after page {}", s.pages)),
            Ok(Done::Pushed(s)) => sluice_jobs::import::push_outcome(s),
            Err(e) => Err(e.to_string()),
        };
        sluice_jobs::schedule::end_manual_run(&store, id, &ended).await?;
    }
    if let (true, Err(ImportError::WrongType { name, actual, .. })) = (dry_run, &result) {
        anyhow::bail!(
            "`{name}` is an {actual} config: --dry-run is for IMPORT configs (a push has none; `sluice import run {name}` sends its batches)"
        );
    }
    let summary = match result? {
        Done::Imported(summary) => *summary,
        Done::Pushed(s) => {
            println!("push {}: {}", s.name, sluice_jobs::import::push_line(&s));
            anyhow::ensure!(
                sluice_jobs::import::push_outcome(&s).is_ok(),
                "push {}: every document failed (mapping or a plugin) and none was sent; the reasons are in `dead_letters`",
                s.name
            );
            return Ok(());
        }
    };
    if dry_run {
        println!("dry run of {} (nothing written):", summary.name);
        for r in &summary.preview {
            println!("  {r}");
        }
    }
    println!(
        "import {} {}: {}, {}, {} inserted, {} updated, {}{} failed mapping, {} ({}), {:.1} s{}",
        summary.name,
        if summary.completed {
            "completed"
        } else if dry_run {
            "checked"
        } else {
            "interrupted"
        },
        counted(summary.pages, "page"),
        counted(summary.fetched, "record"),
        summary.inserted,
        summary.updated,
        crate::engine::already_stored(summary.unchanged),
        summary.failed,
        counted(summary.http.requests, "request"),
        counted(summary.http.retries, "retry"),
        summary.elapsed_ms as f64 / 1000.0,
        if summary.resumed { " (resumed)" } else { "" }
    );
    if let Some(counts) = crate::engine::plugin_counts(&summary) {
        println!("  {counts}");
    }
    for s in summary.samples.iter().take(5) {
        println!("  rejected: {} in {}", s.reason, s.record);
    }
    if summary.dead_letters > 0 {
        println!(
            "  {} {} in dead_letters (failed mapping or validation, a plugin, or a write MongoDB refused; identical records share one letter)",
            counted(summary.dead_letters, "record"),
            if dry_run {
                "a real run would keep"
            } else {
                "kept"
            }
        );
    }
    if let Some(note) = &summary.stopped_early {
        println!("  note: {note}");
    }
    for warning in &summary.warnings {
        println!("  warning: {warning}");
    }
    if !summary.completed && options.progress.stop.load(Relaxed) {
        anyhow::bail!(
            "interrupted by a signal after page {}; the next run resumes there",
            summary.pages
        );
    }
    if summary.completed && !dry_run {
        crate::engine::import_outcome(&summary).map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// Loads the named plugins with their config from `[plugins]`.
pub fn load_plugins(
    config: &Config,
    names: &[String],
) -> anyhow::Result<Vec<std::sync::Arc<dyn sluice_core::transform::Transform>>> {
    Ok(load_plugin_builds(config, names)?
        .into_iter()
        .map(|(t, _)| t)
        .collect())
}

/// Which build of a plugin a process loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginBuild {
    pub name: String,
    pub version: String,
    /// The component's SHA-256 (hex).
    pub sha256: String,
}

impl std::fmt::Display for PluginBuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` {} (sha256 {})",
            self.name,
            self.version,
            &self.sha256[..self.sha256.len().min(12)]
        )
    }
}

/// [`load_plugins`], with the build of each. A build this process had not loaded before
/// (its first load, or another build installed since) is logged, so the log says which
/// build each run and the tracking endpoint use.
pub fn load_plugin_builds(
    config: &Config,
    names: &[String],
) -> anyhow::Result<
    Vec<(
        std::sync::Arc<dyn sluice_core::transform::Transform>,
        PluginBuild,
    )>,
> {
    static LOGGED: std::sync::Mutex<Vec<PluginBuild>> = std::sync::Mutex::new(Vec::new());
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let p = &config.plugins;
    let host = plugin_host(config)?;
    let policy = match p.failure_policy.as_str() {
        "skip-batch" => sluice_plugins::FailurePolicy::SkipBatch,
        "dead-letter" => sluice_plugins::FailurePolicy::DeadLetter,
        _ => sluice_plugins::FailurePolicy::FailRun,
    };
    let grants = plugin_grants(config);
    let loaded: Vec<anyhow::Result<_>> = names
        .iter()
        .map(|name| {
            let t = host.load(
                Path::new(&p.dir),
                name,
                plugin_config(config, name),
                &grants,
                None,
            )?;
            let build = PluginBuild {
                name: name.clone(),
                version: t.version().to_string(),
                sha256: t.sha256().to_string(),
            };
            let mut logged = LOGGED.lock().unwrap_or_else(|p| p.into_inner());
            if !logged.contains(&build) {
                tracing::info!(dir = %p.dir, "plugin {build} loaded ({})", t.compiled_from());
                logged.retain(|b| b.name != build.name);
                logged.push(build.clone());
            }
            Ok((
                std::sync::Arc::new(t.with_policy(policy))
                    as std::sync::Arc<dyn sluice_core::transform::Transform>,
                build,
            ))
        })
        .collect();
    // Every plugin that does not load is said, not only the first of a chain.
    let failed: Vec<String> = loaded
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    if !failed.is_empty() {
        anyhow::bail!("{}", failed.join("\n"));
    }
    loaded.into_iter().collect()
}

/// Why the compile cache set can never be made: its parent folder does not exist. The
/// default sits in the plugin folder, which a command may be run without (`plugin test
/// --wasm`); only a folder set on purpose is said.
fn compile_cache_unmade(config: &Config) -> Option<String> {
    let dir = config.plugins.compile_cache_dir()?;
    let parent = dir.parent().filter(|p| !p.as_os_str().is_empty())?;
    (config.plugins.compile_cache != config::PluginsSection::default().compile_cache
        && !parent.is_dir())
    .then(|| {
        format!(
            "`plugins.compile_cache`: `{}` does not exist, so compiled plugins are not kept",
            parent.display()
        )
    })
}

/// The process's plugin host (one per fuel setting and compile cache): one engine and
/// epoch thread, and a component cache, so scheduled runs load their plugins without
/// compiling them again.
fn plugin_host(config: &Config) -> anyhow::Result<sluice_plugins::PluginHost> {
    type Key = (bool, Option<std::path::PathBuf>);
    static HOSTS: std::sync::Mutex<Vec<(Key, sluice_plugins::PluginHost)>> =
        std::sync::Mutex::new(Vec::new());
    let key = (config.plugins.fuel, config.plugins.compile_cache_dir());
    let mut hosts = HOSTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, host)) = hosts.iter().find(|(k, _)| *k == key) {
        return Ok(host.clone());
    }
    let mut host = sluice_plugins::PluginHost::new(key.0)?;
    if let Some(dir) = &key.1 {
        if let Some(warning) = compile_cache_unmade(config) {
            tracing::warn!("{warning}");
        }
        host = host.with_compile_cache(dir);
    }
    hosts.push((key, host.clone()));
    Ok(host)
}

/// `[plugins.config.NAME]` as the JSON the plugin's `configure` receives (`{}` if unset).
fn plugin_config(config: &Config, name: &str) -> serde_json::Value {
    config.plugin_configs.json(name)
}

/// The capabilities `[plugins] grants` allows.
fn plugin_grants(config: &Config) -> sluice_plugins::Grants {
    sluice_plugins::Grants {
        clocks: config.plugins.grants.iter().any(|g| g == "clocks"),
        max_memory_mib: Some(config.plugins.max_memory_mib),
        max_batch_deadline_ms: Some(config.plugins.max_batch_deadline_ms),
        instances: config.plugins.instances,
    }
}

/// Loads the plugins an integration config names, with this deployment's plugin folder
/// and plugin configs: a config naming a plugin that is missing, was tampered with or
/// refuses its config is refused when it is applied, not at its first scheduled run.
pub fn check_config_transforms(
    config: &Config,
    file: &sluice_core::integration::IntegrationFile,
) -> anyhow::Result<()> {
    load_plugins(config, &file.transforms)
        .map(|_| ())
        .with_context(|| format!("field `transforms` of `{}`", file.name))
}

/// Loads the transform chain an integration config names (`transforms = [...]`).
pub async fn integration_transforms(
    config: &Config,
    store: &Store,
    name: &str,
) -> anyhow::Result<Vec<std::sync::Arc<dyn sluice_core::transform::Transform>>> {
    let names = sluice_jobs::configs::load(store, name)
        .await?
        .map(|(file, _)| file.transforms)
        .unwrap_or_default();
    load_plugins_off_runtime(config, names).await
}

/// [`load_plugins`] on a blocking thread: compiling a component and running its
/// `configure` (under its deadline) would stall an async worker, and with it the tracking
/// endpoint of the same process.
pub async fn load_plugins_off_runtime(
    config: &Config,
    names: Vec<String>,
) -> anyhow::Result<Vec<std::sync::Arc<dyn sluice_core::transform::Transform>>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let config = config.clone();
    tokio::task::spawn_blocking(move || load_plugins(&config, &names)).await?
}

/// A folder holding `file` as `NAME.wasm` beside a manifest for it; removed when dropped.
struct StagedPlugin(std::path::PathBuf);

impl Drop for StagedPlugin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `plugin test --wasm FILE` and `plugin install`: the installed manifest of `name` (its
/// limits and permissions) pointed at the component `bytes` with their checksum, or a
/// manifest of defaults; `version`, when given, replaces the manifest's.
fn stage_plugin(
    installed: &Path,
    name: &str,
    (from, bytes): (&Path, &[u8]),
    version: Option<&str>,
) -> anyhow::Result<StagedPlugin> {
    use sha2::{Digest, Sha256};
    anyhow::ensure!(
        sluice_plugins::is_plugin_name(name),
        "`{name}` is no plugin name (lower-case letters, digits and `-`)"
    );
    // Said of the file given, not of the staged copy the loader would name.
    if let Some(wrong) = sluice_plugins::not_a_component(bytes) {
        anyhow::bail!(
            "`{}` {}",
            from.display(),
            wrong.replace("point the manifest at", "give --wasm")
        );
    }
    let sha256 = format!("{:x}", Sha256::digest(bytes));
    let manifest_path = installed.join(format!("{name}.toml"));
    let mut manifest: toml::Table = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => text
            .parse()
            .with_context(|| format!("`{}`", manifest_path.display()))?,
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("`{}`", manifest_path.display()));
        }
        Err(_) => toml::Table::from_iter([
            ("name".to_string(), toml::Value::String(name.into())),
            (
                "version".to_string(),
                toml::Value::String("0.0.0-test".into()),
            ),
        ]),
    };
    if let Some(v) = version {
        manifest.insert("version".into(), toml::Value::String(v.into()));
    }
    let wasm_name = format!("{name}.wasm");
    manifest.insert("wasm".into(), toml::Value::String(wasm_name.clone()));
    manifest.insert("sha256".into(), toml::Value::String(sha256));
    let dir = std::env::temp_dir().join(format!(
        "sluice-plugin-test-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&dir)?;
    let staged = StagedPlugin(dir);
    std::fs::write(staged.0.join(&wasm_name), bytes)?;
    std::fs::write(staged.0.join(format!("{name}.toml")), manifest.to_string())?;
    Ok(staged)
}

/// `sluice plugin install NAME --wasm FILE`: installs a build into `plugins.dir` once it
/// loads there: under the installed manifest's limits and permissions (or defaults), with
/// `[plugins.config.NAME]`. The component goes in under a name of its own
/// (`NAME-<sha256 prefix>.wasm`) and the manifest is then replaced whole, so a run loading
/// the plugin meanwhile reads the old manifest and component or the new ones, never a
/// mix. The manifest keeps its other lines (comments, limits, permissions, metadata):
/// only the top-level `wasm`, `sha256` (and, with `--version`, `version`) lines change.
/// The component the old manifest named is kept for runs that read it just before; older
/// ones installed this way are removed. Returns what it did, for the operator.
pub fn plugin_install(
    config: &Config,
    name: &str,
    file: &Path,
    version: Option<&str>,
) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    anyhow::ensure!(
        sluice_plugins::is_plugin_name(name),
        "`{name}` is no plugin name (lower-case letters, digits and `-`)"
    );
    let dir = Path::new(&config.plugins.dir);
    let manifest_path = dir.join(format!("{name}.toml"));
    let old_text = match std::fs::read_to_string(&manifest_path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("`{}`", manifest_path.display())),
    };
    anyhow::ensure!(
        old_text.is_some() || version.is_some(),
        "`{name}` has no manifest in `{}` yet: pass --version (the plugin's own version, such as 0.1.0)",
        dir.display()
    );
    if let Some(v) = version {
        anyhow::ensure!(
            sluice_plugins::is_version(v),
            "--version: expected a semantic version (MAJOR.MINOR.PATCH, as in 0.1.0), got `{v}`"
        );
    }
    // Read once: what is checked is what is installed (a build still being written
    // cannot slip in between).
    let bytes = std::fs::read(file).with_context(|| format!("`{}`", file.display()))?;
    // It must load and configure as it will run, its new version too, or nothing is
    // installed.
    let staged = stage_plugin(dir, name, (file, &bytes), version)?;
    let host = plugin_host(config)?;
    let loaded = host.load(
        &staged.0,
        name,
        plugin_config(config, name),
        &plugin_grants(config),
        None,
    );
    drop(staged);
    loaded.with_context(|| {
        format!(
            "`{}` does not load as `{name}`; nothing installed",
            file.display()
        )
    })?;

    let sha256 = format!("{:x}", Sha256::digest(&bytes));
    let wasm = format!("{name}-{}.wasm", &sha256[..12]);
    let old: Option<sluice_plugins::Manifest> = old_text
        .as_deref()
        .map(toml::from_str)
        .transpose()
        .with_context(|| format!("`{}`", manifest_path.display()))?;
    let text = match &old_text {
        Some(text) => {
            let mut text = set_top_level(text, "wasm", &wasm);
            text = set_top_level(&text, "sha256", &sha256);
            if let Some(v) = version {
                text = set_top_level(&text, "version", v);
            }
            text
        }
        None => format!(
            "name = {}\nversion = {}\nwasm = {}\nsha256 = {}\n",
            toml::Value::String(name.into()),
            toml::Value::String(version.unwrap_or_default().into()),
            toml::Value::String(wasm.clone()),
            toml::Value::String(sha256.clone()),
        ),
    };
    // The edit is checked as the loader will read it.
    let new: sluice_plugins::Manifest = toml::from_str(&text).with_context(|| {
        format!("`{}` could not be updated in place; set wasm = \"{wasm}\" and sha256 = \"{sha256}\" by hand", manifest_path.display())
    })?;
    // And nothing else of it changed (a line the edit dropped inside a multi-line value).
    let others = |text: &str| -> Option<toml::Table> {
        let mut t: toml::Table = text.parse().ok()?;
        for k in ["wasm", "sha256", "version"] {
            t.remove(k);
        }
        Some(t)
    };
    let unchanged = old_text
        .as_deref()
        .is_none_or(|o| matches!((others(o), others(&text)), (Some(a), Some(b)) if a == b));
    anyhow::ensure!(
        unchanged && new.name == name && new.wasm == wasm && new.sha256 == sha256 && version.is_none_or(|v| new.version == v),
        "`{}` could not be updated in place; set wasm = \"{wasm}\" and sha256 = \"{sha256}\" by hand",
        manifest_path.display()
    );
    let created = !dir.exists();
    std::fs::create_dir_all(dir).with_context(|| format!("`{}`", dir.display()))?;
    write_in_place(&dir.join(&wasm), &bytes)?;
    write_in_place(&manifest_path, text.as_bytes())?;
    // The check's compile could not be kept if the plugin folder did not exist yet.
    if created {
        host.keep_compiled(&sha256);
    }

    // One component back is kept; older ones this command installed go, unless a
    // manifest of the folder names them (a plugin whose own name looks like this one's
    // with a suffix, installed by hand).
    let kept = old.as_ref().map(|m| m.wasm.clone());
    let named: std::collections::HashSet<String> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "toml"))
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| t.parse::<toml::Table>().ok())
        .filter_map(|t| t.get("wasm").and_then(|w| w.as_str()).map(str::to_string))
        .collect();
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(dir)?.filter_map(Result::ok) {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let ours = file_name
            .strip_prefix(&format!("{name}-"))
            .and_then(|rest| rest.strip_suffix(".wasm"))
            .is_some_and(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if ours
            && file_name != wasm
            && Some(&file_name) != kept.as_ref()
            && !named.contains(&file_name)
        {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing `{}`", entry.path().display()))?;
            removed.push(file_name);
        }
    }
    let mut said = format!(
        "installed {name} {}: {} (sha256 {sha256})",
        new.version,
        dir.join(&wasm).display()
    );
    if let Some(k) = kept.filter(|k| *k != wasm) {
        said.push_str(&format!("; the previous component {k} is kept"));
    }
    if created {
        said.push_str(&format!(
            "; `{}` did not exist and was created (it is `plugins.dir` of the config read: pass `-c` for another sluice.toml's)",
            dir.display()
        ));
    }
    if !removed.is_empty() {
        said.push_str(&format!("; removed older {}", removed.join(", ")));
    }
    said.push_str(". Runs load it from their next start; a running `serve` keeps its tracking plugins until restarted.");
    if sluice_plugins::has_debug_info(&bytes) {
        said.push_str(&format!("\nnote: {}", debug_build_note(file)));
    }
    Ok(said)
}

/// What is said of a component with debug information (see
/// [`sluice_plugins::has_debug_info`]).
fn debug_build_note(file: &Path) -> String {
    format!(
        "`{}` carries debug information: if it is a debug build, a `cargo build --release --target wasm32-wasip2` build runs much faster and is smaller",
        file.display()
    )
}

/// `text` (a TOML document) with its top-level `key` set to the string `value`: the line
/// holding it replaced (a comment at its end goes with it), or one added before the first
/// table. Other lines are kept as they are, with the file's line endings; the caller
/// checks the result by parsing it.
fn set_top_level(text: &str, key: &str, value: &str) -> String {
    let newline = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let line = format!("{key} = {}", toml::Value::String(value.into()));
    let mut out: Vec<String> = Vec::new();
    let mut done = false;
    let mut in_table = false;
    for l in text.lines() {
        let t = l.trim_start();
        if t.starts_with('[') {
            if !done {
                out.push(line.clone());
                done = true;
            }
            in_table = true;
        }
        let sets_key = !in_table
            && t.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='));
        if sets_key && !done {
            out.push(line.clone());
            done = true;
        } else if !sets_key {
            out.push(l.to_string());
        }
    }
    if !done {
        out.push(line);
    }
    out.join(newline) + newline
}

/// Writes `bytes` to `path` under a temporary name, flushes it and renames it into place:
/// a reader finds the old file or the new one, whole.
fn write_in_place(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself survives a power cut once the folder is flushed.
        let folder = path.parent().filter(|f| !f.as_os_str().is_empty());
        std::fs::File::open(folder.unwrap_or(Path::new(".")))?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| format!("writing `{}`", path.display()))
}

/// The NDJSON records of `input` (`-`: standard input), blank lines skipped.
fn read_records(input: &Path) -> anyhow::Result<Vec<bson::Document>> {
    let text = if input == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading standard input")?
    } else {
        std::fs::read_to_string(input).with_context(|| format!("`{}`", input.display()))?
    };
    let mut records = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("`{}` line {}: not JSON", input.display(), i + 1))?;
        match bson::Bson::try_from(v) {
            Ok(bson::Bson::Document(d)) => records.push(d),
            _ => anyhow::bail!("`{}` line {}: not a JSON object", input.display(), i + 1),
        }
    }
    Ok(records)
}

/// `sluice plugin test`: runs NDJSON records through a plugin, prints the outputs (NDJSON on
/// stdout), the failures and the time per batch (stderr).
pub fn plugin_test(
    config: &Config,
    name: &str,
    input: &Path,
    plugin_config: Option<&str>,
    batch_size: usize,
    wasm: Option<&Path>,
) -> anyhow::Result<()> {
    let host = plugin_host(config)?;
    let cfg: serde_json::Value = match plugin_config {
        Some(text) => serde_json::from_str(text).context("--plugin-config is not JSON")?,
        None => self::plugin_config(config, name),
    };
    if !cfg.is_object() {
        anyhow::bail!(
            "--plugin-config must be a JSON object, as the pipelines pass `[plugins.config.{name}]`, got `{cfg}`"
        );
    }
    // Read before the plugin is loaded: compiling a large component (an interpreter's)
    // takes minutes, and a wrong input path should not wait for it.
    let records = read_records(input)?;
    let installed = Path::new(&config.plugins.dir);
    if wasm.is_none() && !installed.join(format!("{name}.toml")).exists() {
        anyhow::bail!(
            "no plugin `{name}` in `{}` (no `{name}.toml` there): test a build with `--wasm FILE`, install it with `plugin install`, or pass `-c` the sluice.toml whose `plugins.dir` holds it",
            installed.display()
        );
    }
    let staged = match wasm {
        Some(file) => {
            let bytes = std::fs::read(file).with_context(|| format!("`{}`", file.display()))?;
            if sluice_plugins::has_debug_info(&bytes) {
                eprintln!("note: {}", debug_build_note(file));
            }
            Some(stage_plugin(installed, name, (file, &bytes), None)?)
        }
        None => None,
    };
    let loaded = host.load(
        staged.as_ref().map_or(installed, |s| s.0.as_path()),
        name,
        cfg,
        &plugin_grants(config),
        None,
    );
    drop(staged);
    let plugin = loaded?;
    eprintln!(
        "{name} {} (sha256 {}): {}",
        plugin.version(),
        plugin.sha256(),
        plugin.compiled_from()
    );
    let (mut outputs, mut failures, mut dropped) = (0, 0, 0);
    let batch_size = batch_size.max(1);
    for (n, batch) in records.chunks(batch_size).enumerate() {
        match plugin.run_batch(batch) {
            Ok(out) => {
                for r in &out.records {
                    println!("{}", bson::Bson::Document(r.clone()).into_relaxed_extjson());
                    // What every import refuses of a plugin's output, whatever its config.
                    let bad: Vec<String> = r
                        .keys()
                        .filter(|k| !sluice_core::model::is_storable_field_name(k))
                        .map(|k| format!("{k:?}"))
                        .collect();
                    if !bad.is_empty() {
                        eprintln!(
                            "output {}: the field name{} {} cannot be written by an import (empty, `$`-prefixed, dotted or with a NUL): an import fails such a record",
                            outputs + 1,
                            if bad.len() == 1 { "" } else { "s" },
                            bad.join(", ")
                        );
                    }
                    outputs += 1;
                }
                for (i, reason) in &out.failed {
                    eprintln!("record {}: failed: {reason}", n * batch_size + i + 1);
                }
                failures += out.failed.len();
                dropped += out.dropped;
                eprintln!(
                    "batch {}: {} records in, {} out, {} failed, {} dropped, {:.2} ms",
                    n + 1,
                    batch.len(),
                    out.records.len(),
                    out.failed.len(),
                    out.dropped,
                    out.elapsed.as_secs_f64() * 1000.0
                );
            }
            Err(e) => {
                // The raw call, as a plugin author debugs it: the pipelines split such a
                // batch in halves until its parts fit (see docs/plugins.md).
                let hint = match e {
                    sluice_plugins::PluginError::Fuel { .. } => {
                        "; pipelines split such a batch until its parts fit: a smaller --batch-size shows whether they do (out of fuel on a batch of one record, the plugin loops or needs a larger `fuel`)"
                    }
                    sluice_plugins::PluginError::Memory { .. }
                    | sluice_plugins::PluginError::Output { .. }
                    | sluice_plugins::PluginError::Fanout { .. } => {
                        "; pipelines split such a batch until its parts fit: a smaller --batch-size shows whether they do"
                    }
                    _ => "",
                };
                eprintln!("batch {}: {e}{hint}", n + 1);
                failures += batch.len();
            }
        }
    }
    eprintln!(
        "{} records in, {outputs} out, {failures} failed, {dropped} dropped",
        records.len()
    );
    // A script checking a plugin learns that it failed from the exit code.
    anyhow::ensure!(
        failures == 0,
        "{failures} of {} records failed in the plugin",
        records.len()
    );
    Ok(())
}

/// `sluice plugin new NAME`: scaffolds a plugin crate.
pub fn plugin_new(name: &str, dir: &Path, sdk: Option<&Path>) -> anyhow::Result<PathBuf> {
    // A name the loader accepts that is also a cargo package and a Rust type name.
    anyhow::ensure!(
        sluice_plugins::is_plugin_name(name)
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && !name.ends_with('-')
            && !name.contains("--"),
        "plugin names start with a lower-case letter, then lower-case letters, digits and single `-`, got `{name}`"
    );
    // The SDK is not published: the crate depends on it by path, a copy of the SDK this
    // binary was built with (vendored into the crate, so it builds anywhere, CI
    // included), or the one `--sdk` names.
    let sdk = match sdk {
        Some(p) => {
            anyhow::ensure!(
                p.join("Cargo.toml").exists(),
                "the plugin SDK is not at `{}`: pass `--sdk PATH` to the `plugins/sdk` folder of the Sluice source, or leave `--sdk` out to get a copy of the SDK in the crate",
                p.display()
            );
            Some(p.canonicalize()?)
        }
        None => None,
    };
    let root = dir.join(name);
    anyhow::ensure!(!root.exists(), "`{}` already exists", root.display());
    std::fs::create_dir_all(root.join("src"))?;
    let sdk_dep = match &sdk {
        Some(path) => format!("{{ path = \"{}\" }}", path.display()),
        None => {
            for (file, text) in SDK_FILES {
                let path = root.join(VENDORED_SDK).join(file);
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                std::fs::write(&path, text)?;
            }
            format!("{{ path = \"{VENDORED_SDK}\" }}")
        }
    };
    std::fs::write(
        root.join("Cargo.toml"),
        format!(
            "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\nsluice-plugin-sdk = {sdk_dep}\n\n[workspace]\n"
        ),
    )?;
    let mut type_name: String = name
        .split('-')
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    // Names the scaffold imports (or a keyword) cannot be the plugin's type.
    if ["Plugin", "Record", "Value", "Self"].contains(&type_name.as_str()) {
        type_name.push_str("Transform");
    }
    std::fs::write(
        root.join("src/lib.rs"),
        format!(
            r#"//! {name}: a Sluice transform plugin.

use sluice_plugin_sdk::{{export_plugin, Plugin, Record, Value}};

pub struct {type_name};

impl Plugin for {type_name} {{
    fn configure(_config: Value) -> Result<Self, String> {{
        Ok({type_name})
    }}

    fn transform(&mut self, record: Record) -> Result<Vec<Record>, String> {{
        // A Record reads and writes like a serde_json::Value (`record["field"]`).
        // Return no record to drop it, several to fan out, or Err(reason) to fail it.
        Ok(vec![record])
    }}
}}

export_plugin!({type_name});
"#
        ),
    )?;
    std::fs::write(
        root.join("README.md"),
        format!(
            "# {name}\n\nBuild: `cargo build --release --target wasm32-wasip2` (once: `rustup target add wasm32-wasip2`){vendored}\n\nTry the build: `sluice plugin test {name} --wasm target/wasm32-wasip2/release/{file}.wasm --input records.ndjson`\n\nInstall it into the plugins folder (it writes the manifest `{name}.toml`, or updates its `wasm` and `sha256`): `sluice plugin install {name} --wasm target/wasm32-wasip2/release/{file}.wasm --version 0.1.0`\n",
            file = name.replace('-', "_"),
            vendored = if sdk.is_none() {
                format!("\n\n`{VENDORED_SDK}/` is a copy of the Sluice plugin SDK (its WIT in `{VENDORED_SDK}/wit/`), from the `sluice` that made this crate; commit it with the plugin. To update it, copy `plugins/sdk` of a newer Sluice over it.")
            } else {
                String::new()
            }
        ),
    )?;
    Ok(root)
}

/// The folder of a scaffolded plugin crate holding its copy of the SDK.
const VENDORED_SDK: &str = "sluice-plugin-sdk";

/// The plugin SDK (`plugins/sdk`) as this binary was built with it: what `plugin new`
/// copies into a crate.
const SDK_FILES: [(&str, &str); 3] = [
    ("Cargo.toml", include_str!("../plugins/sdk/Cargo.toml")),
    ("src/lib.rs", include_str!("../plugins/sdk/src/lib.rs")),
    (
        "wit/transform.wit",
        include_str!("../plugins/sdk/wit/transform.wit"),
    ),
];

/// `sluice jobs list`: scheduled jobs, their next fire and last outcome.
pub async fn jobs_list(config: &Config) -> anyhow::Result<()> {
    let store = connect_named(config).await?;
    // Integration jobs are read from MongoDB, export jobs from the config file: without
    // the file `sluice serve` reads, its exports are not listed.
    if config.schedules.is_empty() {
        eprintln!("(no [[schedules]] in this config: export jobs are listed from the config file `sluice serve` reads; pass it with -c or SLUICE_CONFIG)");
    }
    let jobs = crate::engine::job_overview(config, &store).await?;
    if !jobs.is_empty() {
        println!(
            "{:<36} {:<18} {:<16} NEXT FIRE / LATEST RUN",
            "JOB", "CRON", "TIME ZONE"
        );
    }
    for job in jobs {
        let next = job.next_fire.unwrap_or_else(|e| e);
        // A RUNNING latest run no replica holds: its process stopped (handed back) or
        // its lease lapsed; a replica's sweeper takes it over.
        let orphaned =
            job.running.is_none() && job.last_run.as_ref().is_some_and(|r| r.status == "RUNNING");
        let completed = job
            .last_run
            .as_ref()
            .and_then(|r| r.last_completed_at.clone());
        let last = job
            .last_run
            .map(|r| match r.error {
                // The reason, on one line and cut: `jobs history` has it whole.
                Some(e) => format!(
                    "{} ({}): {}",
                    r.status,
                    r.id,
                    e.lines()
                        .next()
                        .unwrap_or("")
                        .chars()
                        .take(160)
                        .collect::<String>()
                ),
                None => format!("{} ({})", r.status, r.id),
            })
            .unwrap_or_else(|| "never run".into());
        println!(
            "{:<36} {:<18} {:<16} next {}  last {}",
            job.name,
            job.cron.as_deref().unwrap_or("-"),
            job.timezone,
            next,
            last
        );
        if let Some(missed) = job.missed {
            println!("{:<36} MISSED: {missed}", "");
        }
        if let Some(at) = completed {
            println!("{:<36} last COMPLETED run ended {at}", "");
        }
        if let Some(run) = job.running {
            let what = if run.waiting {
                "waiting for a run slot"
            } else {
                "running"
            };
            println!("{:<36} {what}: {}", "", run.id);
        } else if orphaned {
            println!(
                "{:<36} held by no replica (its process stopped, or its lease lapsed): a running replica takes it over within lease_seconds / 2, or as one starts (`sluice jobs history` says when)",
                ""
            );
        }
    }
    Ok(())
}

/// The `[[schedules]]` entry `schedule`, or an error saying there is none.
fn export_schedule<'a>(
    config: &'a Config,
    schedule: &str,
) -> anyhow::Result<&'a sluice_core::config::ScheduleSection> {
    config
        .schedules
        .iter()
        .find(|s| s.name == schedule)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no export schedule `{schedule}` in the config's [[schedules]] (to export without one: `sluice export run`)"
            )
        })
}

/// The export type of the `[[schedules]]` entry `schedule`.
fn export_schedule_kind(
    config: &Config,
    schedule: &str,
) -> anyhow::Result<sluice_core::model::ExportJobType> {
    sluice_core::model::ExportJobType::parse(&export_schedule(config, schedule)?.kind)
        .map_err(|e| anyhow::anyhow!("schedule `{schedule}`: type: expected {e}"))
}

/// `sluice jobs run NAME`: runs a job now (exports: `--from/--to` backfill a window
/// without moving the catch-up point).
pub async fn jobs_run(
    config: &Config,
    name: &str,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
) -> anyhow::Result<()> {
    if let (Some(schedule), true) = (
        name.strip_prefix(crate::engine::EXPORT_PREFIX),
        from.is_some() || to.is_some(),
    ) {
        let kind = export_schedule_kind(config, schedule)?;
        check_export_window(kind, from, to)?;
        export_run(config, kind, from, to, None, false).await?;
        println!("(a backfill: recorded in `export_jobs` with `manual: true`, not in `sluice jobs history`, and the schedule's catch-up point does not move)");
        return Ok(());
    }
    // A bare config name is its integration job, recorded (and found in `jobs history`)
    // under the same name as its scheduled runs.
    let name = &crate::engine::job_name(name);
    if (from.is_some() || to.is_some()) && !name.starts_with(crate::engine::EXPORT_PREFIX) {
        anyhow::bail!(
            "`{name}` takes no --from / --to: an integration fetches what its config and cursor select, resuming an interrupted run from its checkpoint"
        );
    }
    let is_export = name.starts_with(crate::engine::EXPORT_PREFIX);
    // Checked before anything is recorded (or the database reached): a typo must not
    // leave a FAILED run of a job that does not exist.
    let export_kind = name
        .strip_prefix(crate::engine::EXPORT_PREFIX)
        .map(|schedule| export_schedule_kind(config, schedule))
        .transpose()?;
    let store = connect_named(config).await?;
    if let Some(kind) = export_kind {
        require_export_source(config, &store, kind).await?;
    }
    store.init().await?;
    if let Some(integration) = name.strip_prefix(crate::engine::INTEGRATION_PREFIX) {
        if let Err(e) = require_config(&store, integration).await {
            // A bare name that an export schedule has: its prefix was left out.
            if config.schedules.iter().any(|s| s.name == integration) {
                anyhow::bail!(
                    "{e}; `{integration}` is an export schedule: run it as `export:{integration}`"
                );
            }
            return Err(e);
        }
    }
    let runner = crate::engine::EngineRunner {
        config: std::sync::Arc::new(config.clone()),
        store,
    };
    let run = sluice_jobs::schedule::start_manual_run(&runner.store, name, "cli").await?;
    let progress = crate::engine::JobProgress::default();
    let ticker = if is_export {
        spawn_progress(progress.export.clone())
    } else {
        spawn_import_progress(progress.import.clone())
    };
    let result = sluice_jobs::schedule::hold_manual_run(
        &runner.store,
        &run,
        until_signal(&runner.store, runner.run_job_with(name, &progress)),
    )
    .await
    .and_then(|stopped| stopped)
    .unwrap_or_else(Err);
    stop_ticker(ticker).await;
    if is_export {
        eprintln!(); // ends the progress line
    }
    sluice_jobs::schedule::end_manual_run(&runner.store, &run, &result).await?;
    let summary = result.map_err(|e| anyhow::anyhow!("{run}: {e}"))?;
    println!("{name}: {summary} (run {run})");
    Ok(())
}

/// `sluice jobs history [NAME]`: the latest scheduled runs.
pub async fn jobs_history(config: &Config, name: Option<&str>) -> anyhow::Result<()> {
    use futures_util::TryStreamExt;
    let store = connect_named(config).await?;
    // A bare config name is its integration job, as for `jobs run`.
    let filter = match name {
        Some(n) => bson::doc! { "job": crate::engine::job_name(n) },
        None => bson::doc! {},
    };
    let runs: Vec<bson::Document> = store
        .collection(sluice_core::model::collections::SCHEDULED_RUNS)
        .find(filter)
        .sort(bson::doc! { "scheduledFor": -1 })
        .limit(30)
        .await?
        .try_collect()
        .await?;
    match (runs.is_empty(), name) {
        (true, Some(n)) => eprintln!(
            "no run of `{}` is recorded (jobs are named as `sluice jobs list` shows them: `export:NAME`, `integration:NAME` or the config's name); runs are kept 90 days",
            crate::engine::job_name(n)
        ),
        (true, None) => eprintln!(
            "no scheduled or manual job run is recorded in database `{}` (exports run with `sluice export run` are listed by `sluice export history`)",
            config.database
        ),
        _ => {}
    }
    let now = store.now();
    // As wide as the longest id (a run by hand's is long), so the columns line up.
    let width = runs
        .iter()
        .filter_map(|r| r.get_str("_id").ok())
        .map(str::len)
        .max()
        .unwrap_or(0)
        .max(50);
    if !runs.is_empty() {
        println!(
            "{:<width$} {:<10} {:<20} {:>9} {:<30} WHAT HAPPENED",
            "RUN", "STATUS", "STARTED (UTC)", "TOOK", "OWNER"
        );
    }
    for r in runs {
        // When it started and how long it took (or has been going), so a slow run shows.
        let started = r.get_datetime("startedAt").ok();
        let took = match (started, r.get_datetime("endedAt").ok()) {
            (Some(a), Some(b)) => took(b.timestamp_millis() - a.timestamp_millis()),
            (Some(a), None) if r.get_str("status") == Ok("RUNNING") => {
                format!("{}+", took(now.timestamp_millis() - a.timestamp_millis()))
            }
            _ => "-".to_string(),
        };
        let started = started
            .map(|t| t.to_chrono().format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".to_string());
        // A RUNNING run whose lease lapsed: its process stopped renewing it (died, or was
        // killed); a scheduler replica records it so at its next sweep, and with no
        // `sluice serve` running nothing does.
        // One handed back by a shutdown has its lease set to 1970: when it was handed
        // back is what tells.
        let at = |t: &bson::DateTime| t.try_to_rfc3339_string().unwrap_or_default();
        let lapsed = match (r.get_str("status"), r.get_datetime("expiresAt")) {
            (Ok("RUNNING"), Ok(until)) if *until < now => match r.get_datetime("handedBackAt") {
                Ok(back) if r.get_bool("handedBack").unwrap_or(false) => format!(
                    "handed back at {}: its process shut down mid-run (a scheduler replica takes it over at its next sweep); ",
                    at(back)
                ),
                _ => format!(
                    "lease lapsed at {}: its process stopped (a scheduler replica records it at its next sweep); ",
                    at(until)
                ),
            },
            _ => String::new(),
        };
        // A run another replica took over (its first owner died or shut down): an import
        // went on from its checkpoint, an export redid its window.
        let taken_over = match r.get_datetime("takenOverAt") {
            Ok(t) => format!(
                "taken over at {} (attempt {}); ",
                at(t),
                r.get_i32("attempts").unwrap_or(2)
            ),
            Err(_) => String::new(),
        };
        println!(
            "{:<width$} {:<10} {started:<20} {took:>9} {:<30} {taken_over}{lapsed}{}",
            r.get_str("_id").unwrap_or("?"),
            r.get_str("status").unwrap_or("?"),
            r.get_str("owner").unwrap_or("?"),
            r.get_str("result")
                .or_else(|_| r.get_str("error"))
                .or_else(|_| r.get_str("reason"))
                .unwrap_or("")
        );
    }
    Ok(())
}

/// A run's length for a listing: `850ms`, `12.3s`, `4m05s`, `2h07m`.
fn took(ms: i64) -> String {
    let ms = ms.max(0);
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// `sluice export history [TYPE]`: the latest `limit` runs of `export_jobs`, newest first.
pub async fn export_history(
    config: &Config,
    kind: Option<sluice_core::model::ExportJobType>,
    limit: u32,
) -> anyhow::Result<()> {
    use futures_util::TryStreamExt;
    use sluice_core::model::export_job_fields as f;
    let store = connect_named(config).await?;
    let filter = match kind {
        Some(k) => bson::doc! { f::TYPE: k.as_str() },
        None => bson::doc! {},
    };
    let runs: Vec<bson::Document> = store
        .collection(sluice_core::model::collections::EXPORT_JOBS)
        .find(filter)
        .sort(bson::doc! { f::CREATED_AT: -1 })
        .limit(i64::from(limit.max(1)))
        .await?
        .try_collect()
        .await?;
    if runs.is_empty() {
        eprintln!(
            "no export run is recorded in database `{}`{}",
            config.database,
            kind.map(|k| format!(" of type {k}")).unwrap_or_default()
        );
    }
    if !runs.is_empty() {
        println!(
            "{:<40} {:<9} {:<23} {:>14} {:>10}  BY  DESTINATION; ERROR",
            "JOB", "STATUS", "DAYS", "ROWS", "FILES"
        );
    }
    for r in runs {
        // ARCHIVE has no window: the days it archived are its partitions'.
        let archived: Vec<String> = r
            .get_array(sluice_jobs::history::PARTITIONS)
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| p.as_document()?.get_str("prefix").ok())
                    .filter_map(|p| Some(p.rsplit_once("/dt=")?.1.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let window = match (r.get_str(f::WINDOW_START), r.get_str(f::WINDOW_END)) {
            (Ok(a), Ok(b)) if a == b => a.to_string(),
            (Ok(a), Ok(b)) => format!("{a}..{b}"),
            _ if r.get_str(f::TYPE) != Ok(sluice_core::model::ExportJobType::Archive.as_str()) => {
                "-".to_string()
            }
            _ => match (archived.iter().min(), archived.iter().max()) {
                (Some(a), Some(b)) if a == b => a.clone(),
                // A range may leave out days in it that waited: how many it holds.
                (Some(a), Some(b)) => format!("{a}..{b} ({} days)", archived.len()),
                _ => "-".to_string(),
            },
        };
        let int = |k: &str| sluice_core::model::count_in(&r, k);
        let mut by = match r.get_str(sluice_jobs::history::SCHEDULE) {
            Ok(schedule) => format!("schedule {schedule}"),
            Err(_) if r.get_bool(sluice_jobs::history::MANUAL).unwrap_or(false) => {
                "by hand".to_string()
            }
            Err(_) => "scheduled".to_string(),
        };
        if r.get_bool(sluice_jobs::history::LATE_EVENTS)
            .unwrap_or(false)
        {
            by.push_str(", late events");
        }
        if r.contains_key(sluice_jobs::history::EVENTS_DELETED) {
            by.push_str(&format!(
                ", {} events deleted",
                int(sluice_jobs::history::EVENTS_DELETED)
            ));
        }
        let error = r
            .get_str(f::ERROR)
            .map(|e| format!("; {e}"))
            .unwrap_or_default();
        println!(
            "{:<40} {:<9} {:<23} {:>9} rows {:>4} files  {by}  {}{error}",
            r.get_str(f::JOB_ID).unwrap_or("?"),
            r.get_str(f::STATUS).unwrap_or("?"),
            window,
            int(f::RECORDS_PROCESSED),
            int(f::FILES),
            r.get_str(f::DESTINATION).unwrap_or("?"),
        );
    }
    Ok(())
}

/// `sluice admin create-user`: bootstraps the first admin.
pub async fn admin_create_user(
    config: &Config,
    email: &str,
    role: sluice_core::model::Role,
) -> anyhow::Result<()> {
    let password = read_new_password(email, "nothing was created")?;
    let store = connect_named(config).await?;
    store.init().await?;
    crate::server::admin::create_admin_user(&store, email, &password, role)
        .await
        .map_err(anyhow::Error::msg)?;
    println!("created {role} {}", email.trim().to_ascii_lowercase());
    Ok(())
}

/// `sluice admin set-password`: a new password for an admin user (one who forgot theirs,
/// or whose password leaked), their sessions ended.
pub async fn admin_set_password(config: &Config, email: &str) -> anyhow::Result<()> {
    let password = read_new_password(email, "nothing was changed")?;
    let store = connect_named(config).await?;
    crate::server::admin::set_admin_password(&store, email, &password)
        .await
        .map_err(anyhow::Error::msg)?;
    tracing::info!(user = %email.trim().to_ascii_lowercase(), "an admin user's password was set from the command line; their sessions were ended");
    println!(
        "set the password of {}; their sessions were ended",
        email.trim().to_ascii_lowercase()
    );
    Ok(())
}

/// A new password for `email`: `SLUICE_ADMIN_PASSWORD`, else typed at a terminal (not
/// echoed, asked twice so a typo does not lock the user out), else one line of stdin.
fn read_new_password(email: &str, else_said: &str) -> anyhow::Result<String> {
    use std::io::IsTerminal;
    Ok(match std::env::var("SLUICE_ADMIN_PASSWORD") {
        Ok(p) => p,
        Err(_) if std::io::stdin().is_terminal() => {
            let first = rpassword::prompt_password(format!("password for {email}: "))?;
            let again = rpassword::prompt_password("the same password again: ")?;
            anyhow::ensure!(first == again, "the two passwords differ; {else_said}");
            first
        }
        Err(_) => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line)?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    })
}

/// The export kinds whose schedules publish late events again (an ARCHIVE waits for them).
pub(crate) fn late_readers(
    config: &sluice_core::config::Config,
) -> Vec<sluice_core::model::ExportJobType> {
    use sluice_core::model::ExportJobType;
    let mut kinds: Vec<ExportJobType> = config
        .schedules
        .iter()
        .filter_map(|s| ExportJobType::parse(&s.kind).ok())
        .filter(|k| k.by_day())
        .collect();
    kinds.sort_by_key(|k| k.as_str());
    kinds.dedup();
    kinds
}
