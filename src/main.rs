//! `sluice`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::cli;
use sluice_core::model::ExportJobType;

/// mimalloc rather than the system allocator: the tracking path allocates and frees many
/// small buffers per event from many threads, where glibc's malloc spent about a third of
/// the process's CPU (see "Allocator" in the README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Integration and ETL engine for a user-tracking platform"
)]
struct Cli {
    /// Config file (default: ./sluice.toml when present, else embedded defaults).
    #[arg(long, short, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP server (tracking endpoint, health, metrics) and background upkeep.
    Serve,
    /// Database commands.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Integration config files: validate a folder, or apply it to MongoDB.
    Configs {
        #[command(subcommand)]
        command: ConfigsCommand,
    },
    /// Run an integration config now (IMPORT pulls; EXPORT configs push).
    Import {
        #[command(subcommand)]
        command: ImportCommand,
    },
    /// Admin users of the admin and analytics API.
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Scheduled jobs: list them, run one now, see their history.
    Jobs {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// WASM transform plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// Export jobs (Parquet to a local folder or S3).
    Export {
        #[command(subcommand)]
        command: ExportCommand,
    },
    /// The main job on embedded defaults: track a realistic stream of events through the
    /// HTTP endpoint and report what was stored.
    Demo {
        /// Visitors to simulate.
        #[arg(long, default_value_t = 40)]
        visitors: usize,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create an admin user; the password comes from `SLUICE_ADMIN_PASSWORD`, else a prompt at a terminal (not echoed, asked twice), else one line of stdin.
    CreateUser {
        #[arg(long)]
        email: String,
        /// ADMIN, ANALYST or USER.
        #[arg(long, default_value = "ADMIN", value_parser = parse_role)]
        role: sluice_core::model::Role,
    },
    /// Set an admin user's password (read as for `create-user`) and end their sessions.
    SetPassword {
        #[arg(long)]
        email: String,
    },
}

#[derive(Subcommand)]
enum JobsCommand {
    /// Every scheduled job with its next fire and last outcome.
    List,
    /// Run a job now (`export:NAME` or `integration:NAME`).
    Run {
        name: String,
        /// Export backfill: first day (does not move the catch-up point).
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
    },
    /// The latest scheduled runs (of one job).
    History { name: Option<String> },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run NDJSON records through a plugin; print outputs, failures and time per batch.
    Test {
        /// Plugin name (a manifest `NAME.toml` in `plugins.dir`).
        name: String,
        /// Records, one JSON object per line (`-`: standard input).
        #[arg(long)]
        input: PathBuf,
        /// The plugin's config as JSON (default: `[plugins.config.NAME]`).
        #[arg(long = "plugin-config")]
        plugin_config: Option<String>,
        #[arg(long, default_value_t = 1000)]
        batch_size: usize,
        /// A component to test instead of the manifest's (a fresh build, before it is
        /// installed): the manifest `NAME.toml` in `plugins.dir` gives its limits and
        /// permissions if there is one, and the checksum is taken from the file.
        #[arg(long)]
        wasm: Option<PathBuf>,
    },
    /// Install a build into `plugins.dir`, once it loads there (limits, permissions and
    /// `[plugins.config.NAME]` as it will run): the component under a name of its own,
    /// then the manifest's `wasm` and `sha256` (the rest of it kept).
    Install {
        /// Plugin name (its manifest is `NAME.toml` in `plugins.dir`).
        name: String,
        /// The component built (`target/wasm32-wasip2/release/NAME.wasm`).
        #[arg(long)]
        wasm: PathBuf,
        /// The plugin's version, for the manifest (required when there is none yet).
        #[arg(long)]
        version: Option<String>,
    },
    /// Scaffold a plugin crate.
    New {
        /// The plugin's name: lower-case letters, digits and `-` (e.g. `tag-events`).
        name: String,
        /// Where to create it.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Depend on the Sluice plugin SDK at this path (`plugins/sdk` in the Sluice
        /// source) rather than on a copy of it written into the crate (the default).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigsCommand {
    /// Validate every `*.toml` in DIR, or the one file DIR names (no database needed).
    Validate {
        /// The folder of integration config files (or one of them).
        dir: PathBuf,
        /// Check configs whose `${env:NAME}` secrets are not set here (CI): a placeholder
        /// stands in, and the unset names are listed.
        #[arg(long)]
        allow_missing_env: bool,
    },
    /// Validate, then store every config of DIR (or the one file DIR names) in
    /// `integration_configs`.
    Apply { dir: PathBuf },
    /// Delete a stored config (with its checkpoint and saved OAuth token; its run history
    /// and what it imported stay).
    Delete { name: String },
}

#[derive(Subcommand)]
enum ImportCommand {
    /// Run the named config.
    Run {
        name: String,
        /// Fetch and map, print a sample and the counts, write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Drop the config's checkpoint: the next run starts from the last committed cursor
    /// instead of resuming an interrupted run.
    Reset {
        name: String,
        /// Also clear the incremental cursor (an EXPORT config's watermark): the next run
        /// reads (or sends) everything again.
        #[arg(long)]
        cursor: bool,
    },
}

#[derive(Subcommand)]
enum ExportCommand {
    /// Run one export now: EVENT_DATA, USER_DATA, DAILY_ANALYTICS or ARCHIVE.
    Run {
        /// event-data, user-data, daily-analytics or archive (any case; `_` for `-` too).
        #[arg(value_parser = parse_kind)]
        kind: ExportJobType,
        /// First day (YYYY-MM-DD, UTC); default: `--to`, or yesterday.
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        /// Last day, inclusive; default: the first day.
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
        /// Destination overriding `export.destination` (folder or s3://bucket/prefix).
        #[arg(long)]
        dest: Option<String>,
        /// EVENT_DATA and DAILY_ANALYTICS: also publish again every day that received
        /// events since this kind last published it, as a scheduled run does (for exports
        /// driven by an orchestrator rather than `[[schedules]]`).
        #[arg(long)]
        late_days: bool,
    },
    /// The latest export runs, newest first, as `export_jobs` records them: scheduled,
    /// by hand (`export run`, `jobs run`) and the late days published again.
    History {
        /// Only this type (event-data, user-data, daily-analytics, archive).
        #[arg(value_parser = parse_kind)]
        kind: Option<ExportJobType>,
        /// How many runs (default 30).
        #[arg(long, default_value_t = 30)]
        limit: u32,
    },
}

/// A bad value is a command line that cannot be read (exit 64), like any other.
fn parse_role(text: &str) -> Result<sluice_core::model::Role, String> {
    sluice_core::model::Role::parse(&text.to_ascii_uppercase())
        .map_err(|_| format!("expected one of ADMIN, ANALYST, USER, got `{text}`"))
}

fn parse_kind(text: &str) -> Result<ExportJobType, String> {
    ExportJobType::parse(&text.to_ascii_uppercase().replace('-', "_")).map_err(|_| {
        format!("expected one of event-data, user-data, daily-analytics, archive, got `{text}`")
    })
}

#[derive(Subcommand)]
enum DbCommand {
    /// Create every collection and index (idempotent).
    Init,
    /// Delete the dedupe ledger's claims of archived events older than a day. A resend of
    /// such an event is then stored again; claims of events still in `events` are kept.
    PruneLedger {
        /// Claims of events before this day (YYYY-MM-DD, UTC) are deleted.
        #[arg(long)]
        before: chrono::NaiveDate,
        /// Only count what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Give every event in `events` that has no dedupe claim one (events another writer
    /// stored, in a database adopted as it is), so a resend of one is a duplicate rather
    /// than stored and counted again. Leaves existing claims alone; can be run again.
    ClaimEvents,
    /// Count the kept dead letters by pipeline and plugin, with when each group was first
    /// and last seen.
    DeadLetters,
    /// Delete the dead letters of one pipeline (`import:NAME`, `push:NAME`,
    /// `export:TYPE`, `tracking`), all of them or those not seen again since a day: once
    /// what failed them is fixed and the records are read again, or given up on.
    PurgeDeadLetters {
        #[arg(long)]
        pipeline: String,
        /// Only letters last seen before this day (YYYY-MM-DD, UTC).
        #[arg(long)]
        before: Option<chrono::NaiveDate>,
        /// Only count what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Recompute every session and visitor aggregate from the stored events and compare;
    /// list ledger claims whose events were never stored. Reads only. Exits 1 when
    /// something differs.
    Check {
        /// Seconds to wait before looking again at what differs (a batch being written
        /// shows its aggregates ahead of `events` until its insert ends).
        #[arg(long, default_value_t = 30)]
        settle: u64,
        /// How many differing sessions, visitors and claims to list of each.
        #[arg(long, default_value_t = 20)]
        show: usize,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file and print the effective configuration (secrets redacted).
    Check {
        /// The file to check (default: as for --config).
        file: Option<PathBuf>,
        /// Check the file alone: do not load the plugins and GeoIP database it names (in
        /// CI, where they are not built or present).
        #[arg(long)]
        skip_files: bool,
    },
}

/// Exit code for a command line that cannot be read (sysexits' `EX_USAGE`): apart from
/// `2`, an invalid configuration, so CI can tell a typo in a script from a bad config.
const EXIT_USAGE: u8 = 64;

/// Output piped into a reader that stopped reading (`sluice jobs history | head`): the
/// rest is not wanted, so the command ends quietly instead of panicking in `println!`
/// with a backtrace, with the status of a process ended by SIGPIPE (141), as `cat` ends:
/// not 0, which would pass for success what the command had not finished (a `plugin
/// test` whose records failed, under `pipefail`).
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_on_closed_stdout();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // `--help` and `--version` come this way too, and succeed.
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let Command::Configs {
        command:
            ConfigsCommand::Validate {
                dir,
                allow_missing_env,
            },
    } = &cli.command
    {
        // The plugins configs name are loaded under the `sluice.toml` they will run under;
        // without one given or found, or one that loads (its secrets absent in CI), they
        // are not checked.
        let config = match cli::config_path(cli.config.clone()) {
            None => Err("no sluice.toml given (--config) or found here".to_string()),
            Some(path) => cli::load_config(Some(&path))
                .map_err(|e| format!("the sluice.toml did not load ({})", e.first_of())),
        };
        return match cli::configs_validate(dir, *allow_missing_env, config.as_ref()) {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    if let Command::Config {
        command: ConfigCommand::Check { file, skip_files },
    } = &cli.command
    {
        let path = cli::config_path(file.clone().or(cli.config.clone()));
        return match cli::config_check(path.as_deref(), !*skip_files) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    // Scaffolding a plugin reads no config: a broken or absent sluice.toml must not stop it.
    if let Command::Plugin {
        command: PluginCommand::New { name, dir, sdk },
    } = &cli.command
    {
        return match cli::plugin_new(name, dir, sdk.as_deref()) {
            Ok(root) => {
                println!("created {}", root.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let path = cli::config_path(cli.config.clone());
    let config = match cli::load_config(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    cli::init_tracing(&config.log);
    if let Command::Plugin { command } = &cli.command {
        let result = match command {
            PluginCommand::Test {
                name,
                input,
                plugin_config,
                batch_size,
                wasm,
            } => cli::plugin_test(
                &config,
                name,
                input,
                plugin_config.as_deref(),
                *batch_size,
                wasm.as_deref(),
            ),
            PluginCommand::Install {
                name,
                wasm,
                version,
            } => cli::plugin_install(&config, name, wasm, version.as_deref())
                .map(|said| println!("{said}")),
            PluginCommand::New { .. } => unreachable!("handled before the config is read"),
        };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve => cli::serve(config).await,
            Command::Db {
                command: DbCommand::Init,
            } => cli::db_init(&config).await.map(|_| ()),
            Command::Db {
                command: DbCommand::PruneLedger { before, dry_run },
            } => cli::db_prune_ledger(&config, before, dry_run).await,
            Command::Db {
                command: DbCommand::ClaimEvents,
            } => cli::db_claim_events(&config).await,
            Command::Db {
                command: DbCommand::DeadLetters,
            } => cli::db_dead_letters(&config).await,
            Command::Db {
                command:
                    DbCommand::PurgeDeadLetters {
                        pipeline,
                        before,
                        dry_run,
                    },
            } => cli::db_purge_dead_letters(&config, &pipeline, before, dry_run).await,
            Command::Db {
                command: DbCommand::Check { settle, show },
            } => cli::db_check(&config, std::time::Duration::from_secs(settle), show).await,
            Command::Export {
                command:
                    ExportCommand::Run {
                        kind,
                        from,
                        to,
                        dest,
                        late_days,
                    },
            } => match cli::check_export_window(kind, from, to)
                .and_then(|()| cli::check_late_days(kind, late_days, dest.as_deref()))
            {
                Ok(()) => cli::export_run(&config, kind, from, to, dest.as_deref(), late_days)
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            },
            Command::Export {
                command: ExportCommand::History { kind, limit },
            } => cli::export_history(&config, kind, limit).await,
            Command::Configs {
                command: ConfigsCommand::Apply { dir },
            } => cli::configs_apply(&config, &dir).await,
            Command::Configs {
                command: ConfigsCommand::Delete { name },
            } => cli::configs_delete(&config, &name).await,
            Command::Configs { .. } | Command::Plugin { .. } => {
                unreachable!("handled before the runtime starts")
            }
            Command::Import {
                command: ImportCommand::Run { name, dry_run },
            } => cli::import_run(&config, &name, dry_run).await,
            Command::Import {
                command: ImportCommand::Reset { name, cursor },
            } => cli::import_reset(&config, &name, cursor).await,
            Command::Admin {
                command: AdminCommand::CreateUser { email, role },
            } => cli::admin_create_user(&config, &email, role).await,
            Command::Admin {
                command: AdminCommand::SetPassword { email },
            } => cli::admin_set_password(&config, &email).await,
            Command::Jobs { command } => match command {
                JobsCommand::List => cli::jobs_list(&config).await,
                JobsCommand::Run { name, from, to } => {
                    cli::jobs_run(&config, &name, from, to).await
                }
                JobsCommand::History { name } => cli::jobs_history(&config, name.as_deref()).await,
            },
            Command::Demo { visitors } => sluice::demo::run(config, visitors).await,
            Command::Config { .. } => unreachable!("handled before the runtime starts"),
        }
    });
    let code = match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.downcast_ref::<cli::InvalidConfigs>().is_some() {
                2
            } else {
                1
            }
        }
    };
    // Exit without dropping the runtime: the MongoDB driver's background tasks, torn down
    // with it, can print a spurious panic after the work is done and answered. So a stage
    // stopped mid-day (its encoder on a blocking thread) never drops its part folder:
    // removed here.
    sluice_jobs::remove_work_in_progress();
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code)
}
