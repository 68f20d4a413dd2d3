//! `sluice`: the command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use sluice::cli;

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
    /// The main job on embedded defaults: track a realistic stream of events through the
    /// HTTP endpoint and report what was stored.
    Demo {
        /// Visitors to simulate.
        #[arg(long, default_value_t = 40)]
        visitors: usize,
    },
}

#[derive(Subcommand)]
enum DbCommand {
    /// Create every collection and index (idempotent).
    Init,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config file and print the effective configuration (secrets redacted).
    Check {
        /// The file to check (default: as for --config).
        file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Config {
        command: ConfigCommand::Check { file },
    } = &cli.command
    {
        let path = cli::config_path(file.clone().or(cli.config.clone()));
        return match cli::config_check(path.as_deref()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
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
            Command::Demo { visitors } => sluice::demo::run(config, visitors).await,
            Command::Config { .. } => unreachable!("handled before the runtime starts"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
