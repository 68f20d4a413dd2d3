//! The WASM plugin host: third-party transforms as WebAssembly components implementing
//! `plugins/sdk/wit/transform.wit`, run by wasmtime in a sandbox.
//!
//! - **Cheap to run**: a component is compiled once when loaded and pre-instantiated
//!   (`InstancePre`); one instance serves batch after batch and is rebuilt only after a
//!   failure. A batch crosses the boundary in one call.
//! - **Impossible to escape**: no files (no preopened directory), no network (TCP, UDP and
//!   name lookups denied), no environment, no arguments, frozen clocks unless the operator
//!   grants `clocks`. Stdout and stderr are captured and logged under the plugin's name.
//! - **Limits with defaults**: a memory cap (a `ResourceLimiter`: growing past it traps), a
//!   wall-clock deadline per batch (epoch interruption), and optional fuel.
//! - **Failures stay in the batch**: a trap, a deadline or the memory cap fails that batch
//!   with an error naming the plugin and the limit (a record whose output does not decode
//!   fails that record alone); the pipeline's [`FailurePolicy`] decides what happens next.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_core::transform::{Call, Record, Transform, TransformError};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod compile_cache;
pub use compile_cache::CompiledFrom;

mod bindings {
    wasmtime::component::bindgen!({ path: "sdk/wit", world: "plugin" });
}

use bindings::{Plugin, PluginPre};

/// How often the epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(5);

/// The `wasi:clocks` version the linker provides (`wasmtime-wasi`'s); its sleeps are
/// replaced by ones that end at the batch deadline.
const WASI_MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// A plugin's output may hold at most this many JSON values (counted by their separators)
/// more than four times its input's: decoding turns each value into host memory several
/// times its text, so without a bound a short output could exhaust the host.
const OUTPUT_VALUES_ALLOWANCE: usize = 1 << 16;

/// Lines of plugin output logged per call; the rest are counted.
const LOG_LINES_PER_CALL: usize = 50;

/// Bytes of stdout / stderr a plugin instance buffers; an instance past half of it is
/// rebuilt before its next batch, so printing batch after batch never fills the pipe.
/// (One call printing more than this fails: its write errors.)
const PIPE_BYTES: usize = 4 * 1024 * 1024;
/// A pipe this close to full fails the next write of a line or so.
const PIPE_FULL_MARGIN: usize = 64 * 1024;

/// Host memory charged per table element.
const TABLE_ELEMENT_BYTES: usize = 16;
/// The most records one call of a plugin is given (each call has its own deadline): a
/// bigger batch (an export's 8,192 rows, a large import page) is handed over in parts,
/// as `plugin test` times it (1,000 records by default).
pub const RECORDS_PER_CALL: usize = 1_000;
/// How many deadlines narrowing a failing call of up to [`RECORDS_PER_CALL`] records down
/// may spend, in all.
const SPLIT_BUDGET_DEADLINES: u32 = 3;
/// Splitting a batch that hits the memory cap goes on longer (the parts must fit, and a
/// plugin that needs memory usually hits the cap fast), but not for ever: a plugin that
/// hits it whatever its input, slowly, would cost two calls a record.
const MEMORY_SPLIT_BUDGET_DEADLINES: u32 = 20;
/// Host resources (streams, pollables) one instance may hold at once: WASI needs a
/// handful; a plugin that leaks them fails its call instead of growing host memory.
const MAX_HOST_RESOURCES: usize = 1_000;
/// The most random bytes one `get-random-bytes` call may ask for (the host allocates
/// them outside the plugin's memory cap).
const MAX_RANDOM_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginError {
    #[error("plugin `{plugin}`: cannot load: {message}")]
    Load { plugin: String, message: String },
    #[error("plugin `{plugin}`: sha256 of `{file}` is {actual}, the manifest says {expected}")]
    Hash {
        plugin: String,
        file: String,
        expected: String,
        actual: String,
    },
    #[error("plugin `{plugin}` refused its config: {reason}")]
    Refused { plugin: String, reason: String },
    #[error("plugin `{plugin}` exceeded its deadline of {ms} ms for a batch (the manifest's `[limits] batch_deadline_ms`, at most `[plugins] max_batch_deadline_ms`; a plugin that may loop is better stopped by a `fuel` budget)")]
    Deadline { plugin: String, ms: u64 },
    #[error("plugin `{plugin}` exceeded its memory cap of {mib} MiB (the manifest's `[limits] memory_mib`, at most `[plugins] max_memory_mib`)")]
    Memory { plugin: String, mib: u64 },
    #[error("plugin `{plugin}` ran out of fuel ({fuel} units per batch)")]
    Fuel { plugin: String, fuel: u64 },
    #[error("plugin `{plugin}` trapped: {message}")]
    Trap { plugin: String, message: String },
    #[error("plugin `{plugin}` returned malformed output: {message}")]
    Malformed { plugin: String, message: String },
    /// More output than the batch allows (see [`OUTPUT_VALUES_ALLOWANCE`]): bounded by
    /// the input, so a smaller part of the batch may fit.
    #[error("plugin `{plugin}` returned too much output: about {values} JSON values, more than the {allowed} allowed for this batch (four times its input plus {OUTPUT_VALUES_ALLOWANCE})")]
    Fanout {
        plugin: String,
        values: usize,
        allowed: usize,
    },
    #[error("plugin `{plugin}` printed more than its output buffer holds ({mib} MiB) in one call")]
    Output { plugin: String, mib: usize },
    /// A new instance failed before it was given any input (its `configure` trapped or
    /// hit a limit): not the batch's fault.
    #[error("plugin `{plugin}` could not start an instance: {message}")]
    Instance { plugin: String, message: String },
    /// `index` is the record's place (0-based) among the `of` records the plugin was
    /// given (the chain's earlier plugins may have dropped or added records), shown
    /// 1-based as `plugin test` counts them; `event_id` names it for sure.
    #[error("plugin `{plugin}` failed {}{}: {reason}", record_named(*.index, *.of), event_named(.event_id))]
    Record {
        plugin: String,
        index: usize,
        of: usize,
        event_id: Option<String>,
        reason: String,
    },
}

/// "record 3 of 40"; "its record" for a batch of one (a tracking request's event, or a
/// failure a caller narrowed down), where a place says nothing.
fn record_named(index: usize, of: usize) -> String {
    if of <= 1 {
        "its record".to_string()
    } else {
        format!("record {} of {of}", index + 1)
    }
}

fn event_named(id: &Option<String>) -> String {
    id.as_deref()
        .map(|id| format!(" (eventId `{id}`)"))
        .unwrap_or_default()
}

impl PluginError {
    /// Whether the same input would fail the same way: a record the plugin rejected, a
    /// trap, malformed output, a memory or fuel limit (fuel is counted exactly, so it is
    /// as repeatable as a trap). Not a deadline, which depends on the load of the moment,
    /// nor a plugin that cannot load or refused its config.
    pub fn caused_by_input(&self) -> bool {
        match self {
            PluginError::Record { .. }
            | PluginError::Trap { .. }
            | PluginError::Malformed { .. }
            | PluginError::Fanout { .. }
            | PluginError::Memory { .. }
            | PluginError::Fuel { .. } => true,
            // What the plugin printed: it depends on earlier calls of the same instance too
            // (a batch is still split to fit the buffer, see `splittable`).
            PluginError::Load { .. }
            | PluginError::Hash { .. }
            | PluginError::Refused { .. }
            | PluginError::Deadline { .. }
            | PluginError::Instance { .. }
            | PluginError::Output { .. } => false,
        }
    }

    /// This error, met while building an instance (before any input was given): a
    /// failure that would otherwise read as the input's becomes [`PluginError::Instance`].
    fn while_starting(self) -> Self {
        match self {
            PluginError::Deadline { plugin, ms } => PluginError::Instance {
                plugin,
                message: format!("its `configure` ran past the deadline of {ms} ms"),
            },
            PluginError::Trap { ref plugin, .. }
            | PluginError::Memory { ref plugin, .. }
            | PluginError::Fuel { ref plugin, .. }
            | PluginError::Malformed { ref plugin, .. } => PluginError::Instance {
                plugin: plugin.clone(),
                message: self.to_string(),
            },
            other => other,
        }
    }
}

/// Resource limits of one plugin.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub memory_mib: u64,
    pub batch_deadline_ms: u64,
    /// Instructions-ish per batch; `None` = unmetered (fuel must be enabled on the host).
    pub fuel: Option<u64>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mib: 64,
            batch_deadline_ms: 2_000,
            fuel: None,
        }
    }
}

/// The longest batch deadline a plugin may have (`[plugins] max_batch_deadline_ms` is
/// held to it too).
pub const MAX_BATCH_DEADLINE_MS: u64 = sluice_core::config::MAX_PLUGIN_BATCH_DEADLINE_MS;

impl Limits {
    /// Limits no batch could run under are refused when the plugin loads, not found out
    /// batch by batch.
    pub fn check(&self) -> Result<(), String> {
        if self.memory_mib == 0 {
            return Err("`limits.memory_mib` must be at least 1".into());
        }
        if !(1..=MAX_BATCH_DEADLINE_MS).contains(&self.batch_deadline_ms) {
            return Err(format!(
                "`limits.batch_deadline_ms` must be 1 to {MAX_BATCH_DEADLINE_MS}, got {}",
                self.batch_deadline_ms
            ));
        }
        if self.fuel == Some(0) {
            return Err("`limits.fuel` must be at least 1 (leave it out for no fuel limit)".into());
        }
        Ok(())
    }
}

/// `NAME.toml` beside `NAME.wasm`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    /// The component file, relative to the manifest.
    pub wasm: String,
    pub sha256: String,
    #[serde(default)]
    pub limits: Option<Limits>,
    /// Capabilities the plugin asks for; only `clocks` exists. The operator must grant them.
    #[serde(default)]
    pub permissions: Vec<String>,
    /// A description of the config the plugin expects, for people reading the manifest
    /// (nothing checks it).
    #[serde(default)]
    pub config_schema: Option<toml::Value>,
    /// Anything else the author wants to say (description, authors, license, homepage):
    /// not read by Sluice. Other unknown fields are refused, so a misspelt `permisions`
    /// or `limts` does not go unnoticed.
    #[serde(default)]
    pub metadata: Option<toml::Table>,
}

/// The largest component file loaded (compiling is not interruptible, and its cost grows
/// with the component).
pub const MAX_COMPONENT_BYTES: u64 = 64 << 20;

/// What the operator allows a plugin.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub clocks: bool,
    /// The operator's ceilings: a manifest's (or a caller's) limits above them are
    /// lowered to them. `None`: no ceiling.
    pub max_memory_mib: Option<u64>,
    pub max_batch_deadline_ms: Option<u64>,
    /// Instances of the plugin that may run batches at the same time (concurrent tracking
    /// requests); each has its own memory, up to the cap. 0 or 1: one, calls take turns.
    pub instances: usize,
}

/// What to do with a batch that failed in a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Stop the run with the error (default).
    #[default]
    FailRun,
    /// Drop the batch, count it, go on.
    SkipBatch,
    /// Keep the failed records with their reason in the dead-letter list, go on with the
    /// rest.
    DeadLetter,
}

/// The memory cap, over all of an instance's linear memories and tables together: growing
/// past it traps, and the store remembers it did.
struct MemoryCap {
    max_bytes: usize,
    used: usize,
    hit: bool,
}

impl MemoryCap {
    fn grow(&mut self, bytes: usize) -> wasmtime::Result<bool> {
        match self.used.checked_add(bytes) {
            Some(total) if total <= self.max_bytes => {
                self.used = total;
                Ok(true)
            }
            _ => {
                self.hit = true;
                Err(wasmtime::Error::msg("memory cap reached"))
            }
        }
    }
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Past the memory's own declared maximum the growth fails anyway (wasm's `-1`):
        // it is not counted against the cap, as it never happens.
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        self.grow(desired.saturating_sub(current))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|m| desired > m) {
            return Ok(false);
        }
        self.grow(
            desired
                .saturating_sub(current)
                .saturating_mul(TABLE_ELEMENT_BYTES),
        )
    }

    fn instances(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        16
    }
}

struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: MemoryCap,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
    /// Bytes of stdout / stderr already logged.
    logged: [usize; 2],
    /// Where in the stderr pipe the latest call's own output starts (read only when the
    /// call trapped, for a panic's message).
    call_stderr_from: usize,
    /// When the current call's deadline passes: sleeps end there.
    deadline: Instant,
}

impl HostState {
    fn until_deadline_ns(&self) -> u64 {
        self.deadline
            .saturating_duration_since(Instant::now())
            .as_nanos()
            .try_into()
            .unwrap_or(u64::MAX)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// One per process: the engine, the WASI linker and the epoch ticker.
#[derive(Clone)]
pub struct PluginHost {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    /// Compiled components by plugin (its manifest's path), with the component's sha256:
    /// a plugin loaded twice is compiled once, and a new version (whatever its file)
    /// takes the place of the old compile, so a long-running server keeps one per plugin.
    compiled: Arc<Mutex<std::collections::HashMap<PathBuf, (String, Component)>>>,
    fuel: bool,
    /// Compiled components kept on disk across processes, if configured.
    disk: Option<Arc<compile_cache::CompileCache>>,
    _ticker: Arc<Ticker>,
}

struct Ticker(Arc<AtomicBool>);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A frozen clock for plugins that were not granted clocks.
struct Frozen;
impl wasmtime_wasi::HostWallClock for Frozen {
    fn resolution(&self) -> Duration {
        Duration::from_secs(1)
    }
    fn now(&self) -> Duration {
        Duration::ZERO
    }
}
impl wasmtime_wasi::HostMonotonicClock for Frozen {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}

/// Replaces `wasi:clocks/monotonic-clock`'s subscriptions with ones that end no later than
/// the batch deadline. The epoch deadline only interrupts wasm code, and a plugin blocked
/// in a host sleep would otherwise hold its instance (and the callers queued on it) for as
/// long as it asked; now it wakes at the deadline and is interrupted.
fn shorten_sleeps(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::clocks::WasiClocksView;
    use wasmtime_wasi::p2::bindings::clocks::monotonic_clock::Host;
    use wasmtime_wasi::p2::DynPollable;
    linker.allow_shadowing(true);
    let mut clock = linker.instance(WASI_MONOTONIC_CLOCK)?;
    clock.func_wrap(
        "subscribe-duration",
        |mut store: wasmtime::StoreContextMut<'_, HostState>,
         (ns,): (u64,)|
         -> wasmtime::Result<(Resource<DynPollable>,)> {
            let ns = ns.min(store.data().until_deadline_ns());
            Ok((store.data_mut().clocks().subscribe_duration(ns)?,))
        },
    )?;
    clock.func_wrap(
        "subscribe-instant",
        |mut store: wasmtime::StoreContextMut<'_, HostState>,
         (when,): (u64,)|
         -> wasmtime::Result<(Resource<DynPollable>,)> {
            let left = store.data().until_deadline_ns();
            let mut clocks = store.data_mut().clocks();
            let ns = when.saturating_sub(clocks.now()?).min(left);
            Ok((clocks.subscribe_duration(ns)?,))
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

impl PluginHost {
    /// `fuel`: meter instructions (costs some speed); needed for `Limits::fuel`.
    pub fn new(fuel: bool) -> Result<Self, PluginError> {
        let err = |e: wasmtime::Error| PluginError::Load {
            plugin: "*".into(),
            message: format!("{e:#}"),
        };
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        config.consume_fuel(fuel);
        let engine = Engine::new(&config).map_err(err)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(err)?;
        shorten_sleeps(&mut linker).map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("sluice-plugin-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(TICK);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| PluginError::Load {
                    plugin: "*".into(),
                    message: e.to_string(),
                })?;
        }
        Ok(Self {
            engine,
            linker: Arc::new(linker),
            compiled: Default::default(),
            fuel,
            disk: None,
            _ticker: Arc::new(Ticker(stop)),
        })
    }

    /// Keeps compiled components in `dir` (created if missing and its parent exists), so
    /// other processes load them without compiling (see `compile_cache.rs`).
    pub fn with_compile_cache(mut self, dir: impl Into<PathBuf>) -> Self {
        self.disk = Some(Arc::new(compile_cache::CompileCache::new(
            dir.into(),
            &self.engine,
        )));
        self
    }

    /// Writes this process's compile of the component with this SHA-256 to the compile
    /// cache, if it has one and the cache has not: for a build loaded before the cache
    /// folder could be made (`plugin install` making the plugin folder).
    pub fn keep_compiled(&self, sha256: &str) {
        let Some(disk) = &self.disk else { return };
        let component = self
            .compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|(hash, _)| hash.eq_ignore_ascii_case(sha256))
            .map(|(_, c)| c.clone());
        if let Some(c) = component {
            disk.put_if_absent(sha256, &c);
        }
    }

    /// Compiled components held (one per plugin file loaded).
    pub fn compiled_components(&self) -> usize {
        self.compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Loads `dir/NAME.toml` and its component, checks the hash, configures the plugin
    /// once (so a bad config fails here, not on the first batch).
    pub fn load(
        &self,
        dir: &Path,
        name: &str,
        config: serde_json::Value,
        grants: &Grants,
        limits: Option<Limits>,
    ) -> Result<WasmTransform, PluginError> {
        let load = |message: String| PluginError::Load {
            plugin: name.to_string(),
            message,
        };
        if !is_plugin_name(name) {
            return Err(load(
                "plugin names are lowercase letters, digits and dashes (the manifest is NAME.toml in the plugin folder)".into(),
            ));
        }
        let manifest_path = dir.join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| load(format!("`{}`: {e}", manifest_path.display())))?;
        let manifest: Manifest = toml::from_str(&text)
            .map_err(|e| load(format!("`{}`: {e}", manifest_path.display())))?;
        // The manifest speaks for one plugin, and its component sits beside it: errors,
        // logs and metrics carry the name that was checked, and no manifest can point at a
        // file outside the plugin folder.
        if !is_version(&manifest.version) {
            return Err(load(format!(
                "`{}`: `version = \"{}\"` is not a semantic version (MAJOR.MINOR.PATCH, as in 1.4.0)",
                manifest_path.display(),
                manifest.version
            )));
        }
        if manifest.name != name {
            return Err(load(format!(
                "`{}` names the plugin `{}`; a manifest must be named after its plugin",
                manifest_path.display(),
                manifest.name
            )));
        }
        let bare = Path::new(&manifest.wasm)
            .file_name()
            .is_some_and(|f| f == std::ffi::OsStr::new(&manifest.wasm));
        if !bare || manifest.wasm == ".." {
            return Err(load(format!(
                "`wasm = \"{}\"` must be a file name in the plugin folder, not a path",
                manifest.wasm
            )));
        }
        let wasm_path: PathBuf = dir.join(&manifest.wasm);
        // Compiling takes time and memory in proportion to the component, with no way to
        // interrupt it: a component beyond any real transform's size is refused unread.
        let size = std::fs::metadata(&wasm_path)
            .map_err(|e| load(format!("`{}`: {e}", wasm_path.display())))?
            .len();
        if size > MAX_COMPONENT_BYTES {
            return Err(load(format!(
                "`{}` is {size} bytes; components of more than {} MiB are refused",
                wasm_path.display(),
                MAX_COMPONENT_BYTES >> 20
            )));
        }
        let bytes = std::fs::read(&wasm_path)
            .map_err(|e| load(format!("`{}`: {e}", wasm_path.display())))?;
        // Said plainly, before the compiler's own account of the bytes it expected.
        if let Some(wrong) = not_a_component(&bytes) {
            return Err(load(format!("`{}` {wrong}", manifest.wasm)));
        }
        if let Some(wrong) = unprovided_import(&bytes) {
            return Err(load(format!("`{}` {wrong}", manifest.wasm)));
        }
        let actual = format!("{:x}", Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(&manifest.sha256) {
            return Err(PluginError::Hash {
                plugin: name.to_string(),
                file: wasm_path.display().to_string(),
                expected: manifest.sha256.clone(),
                actual,
            });
        }
        for p in &manifest.permissions {
            match p.as_str() {
                "clocks" if grants.clocks => {}
                "clocks" => {
                    return Err(load(
                        "asks for `clocks`, which the operator has not granted (`[plugins] grants = [\"clocks\"]` in sluice.toml grants it)".into(),
                    ))
                }
                other => return Err(load(format!("asks for unknown permission `{other}`"))),
            }
        }
        let mut limits = limits.or(manifest.limits.clone()).unwrap_or_default();
        // The manifest is the plugin author's word; the operator's ceilings win.
        if let Some(max) = grants.max_memory_mib.filter(|max| limits.memory_mib > *max) {
            tracing::info!(plugin = name, "`memory_mib` = {} is above the operator's ceiling (`[plugins] max_memory_mib`): {max} is used", limits.memory_mib);
            limits.memory_mib = max;
        }
        if let Some(max) = grants
            .max_batch_deadline_ms
            .filter(|max| limits.batch_deadline_ms > *max)
        {
            tracing::info!(plugin = name, "`batch_deadline_ms` = {} is above the operator's ceiling (`[plugins] max_batch_deadline_ms`): {max} is used", limits.batch_deadline_ms);
            limits.batch_deadline_ms = max;
        }
        // Checked as they will run, so a manifest the ceilings lower loads.
        limits.check().map_err(load)?;
        if limits.fuel.is_some() && !self.fuel {
            return Err(load(
                "has a fuel limit but the host meters no fuel: set `[plugins] fuel = true` in sluice.toml (metering costs some speed), or remove `fuel` from the manifest's `[limits]` (the batch deadline still bounds its time)"
                    .into(),
            ));
        }
        // Kept per plugin (its manifest's path, made absolute), not per component file: a
        // deploy that points the manifest at a new file (`p-1.2.wasm`), or swaps a link,
        // replaces the plugin's compile instead of adding one per version for the life of
        // the process.
        let key = std::path::absolute(&manifest_path).unwrap_or_else(|_| manifest_path.clone());
        let cached = self
            .compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .filter(|(hash, _)| *hash == actual)
            .map(|(_, c)| c.clone());
        let (component, compiled_from) = match cached {
            Some(c) => (c, CompiledFrom::Memory),
            None => {
                let on_disk = self
                    .disk
                    .as_ref()
                    .and_then(|d| d.get(&self.engine, &actual));
                let (c, from) = match on_disk {
                    Some(c) => (c, CompiledFrom::Disk),
                    None => {
                        let started = Instant::now();
                        let c = Component::new(&self.engine, &bytes)
                            .map_err(|e| load(format!("{e:#}")))?;
                        let took = started.elapsed();
                        if let Some(d) = &self.disk {
                            d.put(&actual, &c);
                        }
                        (c, CompiledFrom::Compiled(took))
                    }
                };
                self.compiled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, (actual.clone(), c.clone()));
                (c, from)
            }
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| load(format!("{e:#}")))?;
        let pre = PluginPre::new(pre).map_err(|e| load(format!("{e:#}")))?;
        let t = WasmTransform {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            sha256: actual.clone(),
            compiled_from,
            host: self.clone(),
            pre,
            config: config.to_string(),
            limits,
            clocks: grants.clocks && manifest.permissions.iter().any(|p| p == "clocks"),
            pool: Mutex::new(Pool::default()),
            freed: Condvar::new(),
            max_instances: grants.instances.max(1),
            policy: FailurePolicy::FailRun,
            skipped_records: Mutex::new(0),
            stderr_repeats: Mutex::new(Repeats::default()),
        };
        // The first instance is built now, so a plugin that cannot start fails the load.
        let first = off_runtime(|| t.instantiate()).map_err(PluginError::while_starting)?;
        tracing::debug!(plugin = %t.name, version = %t.version, sha256 = %actual, "plugin loaded");
        let mut pool = t.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.idle.push(first);
        pool.count = 1;
        pool.peak = 1;
        drop(pool);
        // At 0 from the load: a plugin's first failure is then an increase an alert sees.
        count_failed_batches(&t.name, 0);
        Ok(t)
    }
}

/// A plugin's instances.
#[derive(Default)]
struct Pool {
    idle: Vec<(Store<HostState>, Plugin)>,
    /// Idle and running.
    count: usize,
    /// The most there ever were at once.
    peak: usize,
}

/// One instance taken from the pool for a batch. Dropped without [`Checkout::hand_back`]
/// (a trap, bad output, a full output buffer, a panic), the instance is discarded and its
/// place freed for a new one.
struct Checkout<'a> {
    owner: &'a WasmTransform,
    /// `None` once handed back.
    live: Option<(Store<HostState>, Plugin)>,
    /// Taken from the idle instances (it served a batch before), not built for this one.
    reused: bool,
}

impl Checkout<'_> {
    fn hand_back(mut self) {
        if let Some(live) = self.live.take() {
            let mut pool = self.owner.pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.idle.push(live);
            drop(pool);
            self.owner.freed.notify_one();
        }
    }
}

/// When splitting a failing batch stops, by the kind of failure.
#[derive(Clone, Copy)]
struct Until {
    trap: Instant,
    memory: Instant,
}

impl Until {
    /// When splitting for `e` stops.
    fn of(&self, e: &PluginError) -> Instant {
        match e {
            // Failures whose parts must fit: splitting goes on until they do.
            PluginError::Memory { .. }
            | PluginError::Fuel { .. }
            | PluginError::Output { .. }
            | PluginError::Fanout { .. } => self.memory,
            _ => self.trap,
        }
    }
}

/// A trap, with what the call last wrote to stderr: a Rust panic traps as
/// `unreachable`, and its message went to stderr.
fn explained(e: PluginError, state: &HostState) -> PluginError {
    match e {
        PluginError::Trap { plugin, message } => {
            let printed = state.stderr.contents();
            let words = last_words(&String::from_utf8_lossy(
                printed.get(state.call_stderr_from..).unwrap_or_default(),
            ));
            let message = if words.is_empty() {
                message
            } else {
                format!("{message}{}{words})", sluice_core::transform::STDERR_NOTE)
            };
            PluginError::Trap { plugin, message }
        }
        other => other,
    }
}

/// What a call last wrote to stderr, as a trap's explanation: a Rust panic's location and
/// message (`thread '..' panicked at src/lib.rs:9:5:` then the message), else the last
/// line that is not a `note:`; cut short.
fn last_words(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("note:"))
        .collect();
    let words = match lines.iter().rposition(|l| l.contains(" panicked at ")) {
        Some(at) => lines[at..(at + 2).min(lines.len())].join(" "),
        None => lines.last().map(|l| l.to_string()).unwrap_or_default(),
    };
    plugin_text(words.chars().take(300).collect())
}

/// A place in a plugin's instance pool taken for an instance being built: given back when
/// dropped (forgotten once the instance exists).
struct Place<'a>(&'a WasmTransform);

impl Drop for Place<'_> {
    fn drop(&mut self) {
        self.0.free_place();
    }
}

impl Drop for Checkout<'_> {
    fn drop(&mut self) {
        if let Some(live) = self.live.take() {
            drop(live);
            self.owner.free_place();
        }
    }
}

/// `sluice_plugin_failed_batches_total{plugin}`.
fn count_failed_batches(plugin: &str, n: u64) {
    sluice_core::metrics::count(
        "sluice_plugin_failed_batches_total",
        "Plugin batches that failed the run (trap, limit, bad output, rejected record).",
        &[("plugin", plugin)],
        n,
    );
}

/// A loaded plugin, usable as a [`Transform`].
pub struct WasmTransform {
    name: String,
    version: String,
    /// The component's SHA-256 (hex), as checked against the manifest.
    sha256: String,
    compiled_from: CompiledFrom,
    host: PluginHost,
    pre: PluginPre<HostState>,
    config: String,
    limits: Limits,
    clocks: bool,
    /// Instances not running a batch, and how many exist in all.
    pool: Mutex<Pool>,
    /// Signalled when an instance is handed back or dropped.
    freed: Condvar,
    /// The most instances at once ([`Grants::instances`]).
    max_instances: usize,
    policy: FailurePolicy,
    skipped_records: Mutex<u64>,
    /// What the plugin last wrote to stderr, so the same text again is not logged again.
    stderr_repeats: Mutex<Repeats>,
}

/// Output a plugin writes again and again: a panic repeated on every part of a batch
/// split to narrow it down, or on every batch. The same text (one call's output, whole)
/// within [`Repeats::WINDOW`] of its first logging is counted, not logged; the count is
/// logged with the next other text, or with the same text once the window has passed.
#[derive(Debug, Default)]
struct Repeats {
    last: Option<(u64, Instant)>,
    suppressed: u64,
}

impl Repeats {
    const WINDOW: Duration = Duration::from_secs(60);

    /// Whether `text` is to be logged, and how many repeats of the previous text were
    /// left unlogged before it.
    fn seen(&mut self, text: &str, now: Instant) -> (bool, u64) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        text.hash(&mut h);
        let hash = h.finish();
        if let Some((last, since)) = self.last {
            if last == hash && now.duration_since(since) < Self::WINDOW {
                self.suppressed += 1;
                return (false, 0);
            }
        }
        self.last = Some((hash, now));
        (true, std::mem::take(&mut self.suppressed))
    }
}

/// Output of one batch.
#[derive(Debug, Default)]
pub struct BatchOutput {
    pub records: Vec<Record>,
    /// (index in the batch, reason) of records the plugin failed.
    pub failed: Vec<(usize, String)>,
    /// Input records the plugin returned nothing for (filtered out).
    pub dropped: usize,
    pub elapsed: Duration,
}

impl WasmTransform {
    pub fn with_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The most instances of this plugin that ever ran at once.
    pub fn peak_instances(&self) -> usize {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).peak
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The manifest's `version`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The component's SHA-256 (hex).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Where its compiled component came from.
    pub fn compiled_from(&self) -> CompiledFrom {
        self.compiled_from
    }

    pub fn skipped_records(&self) -> u64 {
        *self
            .skipped_records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn instantiate(&self) -> Result<(Store<HostState>, Plugin), PluginError> {
        let stdout = MemoryOutputPipe::new(PIPE_BYTES);
        let stderr = MemoryOutputPipe::new(PIPE_BYTES);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .max_random_size(MAX_RANDOM_BYTES);
        if !self.clocks {
            wasi.wall_clock(Frozen).monotonic_clock(Frozen);
        }
        let state = HostState {
            wasi: wasi.build(),
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(MAX_HOST_RESOURCES);
                table
            },
            limits: MemoryCap {
                max_bytes: self.memory_cap_bytes(),
                used: 0,
                hit: false,
            },
            stdout,
            stderr,
            logged: [0, 0],
            call_stderr_from: 0,
            deadline: Instant::now(),
        };
        let mut store = Store::new(&self.host.engine, state);
        store.limiter(|s| &mut s.limits);
        // What the host copies out of the plugin in one call (its output strings) is
        // bounded by the memory cap too.
        store.set_hostcall_fuel(self.memory_cap_bytes());
        self.arm(&mut store);
        let instantiated = self.pre.instantiate(&mut store);
        let hit = store.data().limits.hit;
        let plugin = instantiated.map_err(|e| self.classify(e, hit))?;
        let configured = plugin.call_configure(&mut store, &self.config);
        self.flush_output(&mut store);
        let hit = store.data().limits.hit;
        match configured.map_err(|e| explained(self.classify(e, hit), store.data()))? {
            Ok(()) => Ok((store, plugin)),
            Err(reason) => Err(PluginError::Refused {
                plugin: self.name.clone(),
                reason: given_reason(reason),
            }),
        }
    }

    fn memory_cap_bytes(&self) -> usize {
        usize::try_from(self.limits.memory_mib.saturating_mul(1024 * 1024)).unwrap_or(usize::MAX)
    }

    /// Sets the batch deadline (and fuel) before a call.
    fn arm(&self, store: &mut Store<HostState>) {
        store.data_mut().deadline =
            Instant::now() + Duration::from_millis(self.limits.batch_deadline_ms);
        let ticks = self
            .limits
            .batch_deadline_ms
            .div_ceil(TICK.as_millis() as u64)
            .max(1);
        store.set_epoch_deadline(ticks);
        store.epoch_deadline_trap();
        if let Some(fuel) = self.limits.fuel {
            let _ = store.set_fuel(fuel);
        } else if self.host.fuel {
            let _ = store.set_fuel(u64::MAX);
        }
    }

    fn classify(&self, e: wasmtime::Error, memory_cap_hit: bool) -> PluginError {
        let plugin = self.name.clone();
        // Output larger than the host copies out in one call (bounded by the memory cap):
        // wasmtime says so only in its message. A limit like the memory cap, and split
        // like it.
        let output_cap_hit = format!("{e:#}").contains("fuel allocated for hostcalls");
        if memory_cap_hit || output_cap_hit {
            return PluginError::Memory {
                plugin,
                mib: self.limits.memory_mib,
            };
        }
        if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
            match trap {
                wasmtime::Trap::Interrupt => {
                    return PluginError::Deadline {
                        plugin,
                        ms: self.limits.batch_deadline_ms,
                    }
                }
                wasmtime::Trap::OutOfFuel => {
                    return PluginError::Fuel {
                        plugin,
                        fuel: self.limits.fuel.unwrap_or(0),
                    }
                }
                _ => {}
            }
        }
        // The trap's own message (a panic's "unreachable", an out-of-bounds access) rather
        // than the first line of the context chain, which only says where it happened.
        let full_table = matches!(
            e.root_cause()
                .downcast_ref::<wasmtime::component::ResourceTableError>(),
            Some(wasmtime::component::ResourceTableError::Full)
        );
        let message = match e.downcast_ref::<wasmtime::Trap>() {
            Some(trap) => trap.to_string(),
            None if full_table => format!(
                "it holds as many WASI resources at once as an instance may ({MAX_HOST_RESOURCES} entries of its resource table: streams, pollables, a clock subscription takes two); a plugin that does not drop them leaks them"
            ),
            // wasmtime puts the wasm backtrace around a host error as its outer context:
            // the cause (a full resource table, too much randomness asked) is innermost.
            None => e
                .root_cause()
                .to_string()
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
        };
        PluginError::Trap { plugin, message }
    }

    /// Logs what the plugin printed since the last call, tagged with its name (at most
    /// [`LOG_LINES_PER_CALL`] lines a call; stderr as warnings). Returns whether the pipes
    /// are more than half full, so the instance should be rebuilt with fresh ones.
    fn flush_output(&self, store: &mut Store<HostState>) -> bool {
        let mut full = false;
        for (i, stream) in ["stdout", "stderr"].into_iter().enumerate() {
            let state = store.data_mut();
            let pipe = if i == 0 { &state.stdout } else { &state.stderr };
            let bytes = pipe.contents();
            let new = bytes.get(state.logged[i]..).unwrap_or_default();
            if i == 1 {
                state.call_stderr_from = state.logged[i];
            }
            state.logged[i] = bytes.len();
            full |= bytes.len() > PIPE_BYTES / 2;
            if new.is_empty() {
                continue;
            }
            let text = String::from_utf8_lossy(new);
            if i == 1 {
                let (log, unlogged) = self
                    .stderr_repeats
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .seen(&text, Instant::now());
                if unlogged > 0 {
                    tracing::warn!(plugin = %self.name, stream, "the stderr output logged before was written {} more times", unlogged);
                }
                if !log {
                    continue;
                }
            }
            let mut lines = text.lines();
            for line in lines.by_ref().take(LOG_LINES_PER_CALL) {
                // Control characters as spaces: a carriage return or an escape code
                // would let a plugin forge log lines on a terminal.
                let line: String = line
                    .chars()
                    .take(1000)
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                if i == 0 {
                    tracing::info!(plugin = %self.name, stream, "{line}");
                } else {
                    tracing::warn!(plugin = %self.name, stream, "{line}");
                }
            }
            let more = lines.count();
            if more > 0 {
                tracing::warn!(plugin = %self.name, stream, "{more} more lines not logged");
            }
        }
        full
    }

    /// Runs one batch through the plugin (the input is left as it is; unchanged records
    /// are copied into the output).
    pub fn run_batch(&self, batch: &[Record]) -> Result<BatchOutput, PluginError> {
        let started = Instant::now();
        let outcomes = self.call(batch)?;
        let mut out = BatchOutput::default();
        for (index, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Outcome::Keep => out.records.push(batch[index].clone()),
                Outcome::Records(records) => {
                    out.dropped += usize::from(records.is_empty());
                    out.records.extend(records)
                }
                Outcome::Failed(reason) => out.failed.push((index, reason)),
            }
        }
        out.elapsed = started.elapsed();
        Ok(out)
    }

    /// Calls the plugin on `batch` and decodes what it returned, one outcome per input
    /// record; results that do not fit the batch fail it whole before anything is used.
    fn call(&self, batch: &[Record]) -> Result<Vec<Outcome>, PluginError> {
        let mut reused = false;
        match self.call_on(batch, false, &mut reused) {
            // An instance that served earlier batches carries what they left: memory they
            // grew, a cache, a bug they set off. A trap or the memory cap there would be
            // blamed on this batch's records (rejected, dead-lettered): it is run again
            // on a fresh instance first, and only that answer counts.
            Err(PluginError::Trap { .. } | PluginError::Memory { .. }) if reused => {
                self.call_on(batch, true, &mut reused)
            }
            other => other,
        }
    }

    /// One call on an instance from the pool (`fresh`: a new one); `reused` tells whether
    /// the instance had served a batch before.
    fn call_on(
        &self,
        batch: &[Record],
        fresh: bool,
        reused: &mut bool,
    ) -> Result<Vec<Outcome>, PluginError> {
        let encoded: Vec<String> = batch.iter().map(encode).collect();
        let mut instance = self.checkout(fresh).map_err(PluginError::while_starting)?;
        *reused = instance.reused;
        let Some((store, plugin)) = instance.live.as_mut() else {
            return Err(PluginError::Trap {
                plugin: self.name.clone(),
                message: "no instance".into(),
            });
        };
        self.arm(store);
        // Sleeps end at this instant: a call that returns from one has used up its time,
        // whatever the coarser epoch ticker has counted so far.
        let deadline = store.data().deadline;
        let (result, pipes_full) = off_runtime(|| {
            let result = plugin.call_transform(&mut *store, &encoded);
            (result, self.flush_output(store))
        });
        let results = match result {
            Ok(r) => r,
            // The instance may be in any state after a trap: it is dropped (by the
            // checkout's drop) and a new one is built when needed.
            Err(e) => {
                // A write to a full output pipe fails inside the plugin, which usually
                // panics on it (`println!`): that is the output's fault, not the input's.
                let state = store.data();
                let limit = matches!(
                    e.downcast_ref::<wasmtime::Trap>(),
                    Some(wasmtime::Trap::Interrupt | wasmtime::Trap::OutOfFuel)
                );
                // The output was just flushed: `logged` is how full each pipe is.
                let full = state
                    .logged
                    .iter()
                    .any(|n| n + PIPE_FULL_MARGIN >= PIPE_BYTES);
                if full && !limit && !state.limits.hit {
                    return Err(PluginError::Output {
                        plugin: self.name.clone(),
                        mib: PIPE_BYTES >> 20,
                    });
                }
                return Err(explained(self.classify(e, state.limits.hit), state));
            }
        };
        let mut undecodable = false;
        let decoded = self.decode_results(batch, &encoded, results, &mut undecodable);
        let decoded = match decoded {
            Ok(_) if Instant::now() >= deadline => Err(PluginError::Deadline {
                plugin: self.name.clone(),
                ms: self.limits.batch_deadline_ms,
            }),
            other => other,
        };
        // Documented: an instance that sent malformed output is not trusted again, and
        // one whose output buffer is half full is rebuilt.
        if decoded.is_ok() && !pipes_full && !undecodable {
            instance.hand_back();
        }
        decoded
    }

    /// Gives back the place of an instance that was discarded or never built.
    fn free_place(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.count = pool.count.saturating_sub(1);
        drop(pool);
        self.freed.notify_one();
    }

    /// An idle instance, or a new one while fewer than `max_instances` exist, or else the
    /// next one handed back.
    fn checkout(&self, fresh: bool) -> Result<Checkout<'_>, PluginError> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(live) = pool.idle.pop() {
                if !fresh {
                    return Ok(Checkout {
                        owner: self,
                        live: Some(live),
                        reused: true,
                    });
                }
                // A new instance is wanted: this one's place goes to it.
                drop(live);
                pool.count = pool.count.saturating_sub(1);
            }
            if pool.count < self.max_instances {
                pool.count += 1;
                pool.peak = pool.peak.max(pool.count);
                drop(pool);
                // The place is given back if the build fails, and if it panics (a thread
                // that could not be spawned): else every later call would wait for ever.
                let place = Place(self);
                let built = off_runtime(|| self.instantiate());
                return built.map(|live| {
                    std::mem::forget(place);
                    Checkout {
                        owner: self,
                        live: Some(live),
                        reused: false,
                    }
                });
            }
            pool = self.freed.wait(pool).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Checks the plugin's results against its batch and decodes them. A record whose
    /// output does not decode fails alone (`undecodable` is then set: the instance is not
    /// trusted again); results that do not fit the batch fail it whole.
    fn decode_results(
        &self,
        batch: &[Record],
        encoded: &[String],
        results: Vec<Result<Vec<String>, String>>,
        undecodable: &mut bool,
    ) -> Result<Vec<Outcome>, PluginError> {
        if results.len() != batch.len() {
            return Err(PluginError::Malformed {
                plugin: self.name.clone(),
                message: format!("{} results for a batch of {}", results.len(), batch.len()),
            });
        }
        let values_in: usize = encoded.iter().map(|t| json_values(t)).sum();
        let values_out: usize = results
            .iter()
            .flat_map(|r| r.iter().flatten())
            .map(|t| json_values(t))
            .sum();
        let allowed = values_in
            .saturating_mul(4)
            .saturating_add(OUTPUT_VALUES_ALLOWANCE);
        if values_out > allowed {
            return Err(PluginError::Fanout {
                plugin: self.name.clone(),
                values: values_out,
                allowed,
            });
        }
        results
            .into_iter()
            .enumerate()
            .map(|(index, r)| match r {
                // Returned exactly as sent: keep the original document (no decoding, and
                // every BSON type stays as it was).
                Ok(records) if records.len() == 1 && records[0] == encoded[index] => {
                    Ok(Outcome::Keep)
                }
                Ok(records) => Ok(records
                    .iter()
                    .map(|text| {
                        let mut out = decode(text)?;
                        keep_widths(&mut out, &batch[index]);
                        Ok(out)
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .map_or_else(
                        |message| {
                            *undecodable = true;
                            Outcome::Failed(malformed(&message))
                        },
                        Outcome::Records,
                    )),
                Err(reason) => Ok(Outcome::Failed(given_reason(reason))),
            })
            .collect()
    }
}

/// Longest reason a plugin may give for refusing its config or failing a record, in
/// characters.
pub const MAX_REASON_CHARS: usize = 1_000;

/// A reason written by a plugin, as the host keeps it: control characters (a forged log
/// line) as spaces, and cut at [`MAX_REASON_CHARS`]. It is copied into every dead letter
/// of its batch, the logs and HTTP answers: a plugin's 60 MiB reason must not be.
/// The reason of a record whose output does not decode. The decoder's message can quote
/// the plugin's output whole (a `$numberLong` string of any length): cut like any reason
/// a plugin gives.
fn malformed(message: &str) -> String {
    plugin_text(format!(
        "its output for this record is malformed: {message}"
    ))
}

/// A reason a plugin gave (for failing a record, for refusing its config), as
/// [`plugin_text`]; one left blank is said to be, so a dead letter never has an empty
/// reason.
fn given_reason(reason: String) -> String {
    if reason.trim().is_empty() {
        return "(the plugin gave no reason)".into();
    }
    plugin_text(reason)
}

fn plugin_text(reason: String) -> String {
    let total = reason.chars().count();
    if total <= MAX_REASON_CHARS && !reason.chars().any(char::is_control) {
        return reason;
    }
    let mut kept: String = reason
        .chars()
        .take(MAX_REASON_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if total > MAX_REASON_CHARS {
        kept += &format!(" ... ({} more characters cut)", total - MAX_REASON_CHARS);
    }
    kept
}

/// What is wrong with `bytes` as a component, told from its header: not WebAssembly at
/// all, or a core module (what `wasm32-unknown-unknown` and `wasm32-wasip1` builds are).
pub fn not_a_component(bytes: &[u8]) -> Option<&'static str> {
    const MAGIC: &[u8] = b"\0asm";
    if !bytes.starts_with(MAGIC) || bytes.len() < 8 {
        return Some("is not WebAssembly (it does not begin with `\\0asm`): point the manifest at the `.wasm` a `cargo build --release --target wasm32-wasip2` writes");
    }
    // After the magic: a 16-bit version, then the layer, 0 for a core module and 1 for a
    // component (whatever its version: one the engine does not know is its to say).
    if bytes[6..8] == [0x00, 0x00] {
        return Some("is a core WebAssembly module, not a component: build it for `wasm32-wasip2` (or wrap a module with `wasm-tools component new`)");
    }
    None
}

/// The `version` and `sha256` the manifest of plugin `name` in `dir` names now: what a
/// load would load (`None` when it cannot be read). A process compares it with what it
/// loaded to tell that another build was installed since.
pub fn installed_build(dir: &Path, name: &str) -> Option<(String, String)> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.toml"))).ok()?;
    let manifest: Manifest = toml::from_str(&text).ok()?;
    Some((manifest.version, manifest.sha256.to_ascii_lowercase()))
}

/// The first interface a component imports that the host does not provide (`wasi:http`),
/// with what to do about it: read from its import section, before the (possibly minutes
/// long) compile, which would otherwise end with the linker's account of the missing
/// resource. Only the component's own imports count: a component nested in it may import
/// what a sibling exports.
pub fn unprovided_import(bytes: &[u8]) -> Option<String> {
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        match payload.ok()? {
            wasmparser::Payload::Version { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentImportSection(imports) if depth == 1 => {
                for import in imports {
                    let name = import.ok()?.name.name;
                    if name.starts_with("wasi:http/") {
                        return Some(format!(
                            "imports `{name}`: plugins get no network, and the host provides no `wasi:http` (componentize-js adds it unless built with `--disable http fetch-event`)"
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    None
}

/// Whether a component carries DWARF debug information: a `.debug_*` custom section, in
/// itself or a module inside it. The mark of a debug build (`cargo build` without
/// `--release`), which runs unoptimized; a release build with `debug = true` has it too,
/// so it is a note for the operator, never a refusal.
pub fn has_debug_info(bytes: &[u8]) -> bool {
    wasmparser::Parser::new(0).parse_all(bytes).any(|payload| {
        matches!(payload, Ok(wasmparser::Payload::CustomSection(c)) if c.name().starts_with(".debug_"))
    })
}

/// `MAJOR.MINOR.PATCH`, optionally with a `-pre-release` and `+build` (Semantic
/// Versioning 2.0.0: numbers without leading zeros; identifiers of ASCII letters, digits
/// and `-`, numeric pre-release identifiers without leading zeros).
pub fn is_version(v: &str) -> bool {
    let number = |p: &str| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_digit())
            && (p.len() == 1 || !p.starts_with('0'))
    };
    let identifier =
        |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let (rest, build) = match v.split_once('+') {
        Some((rest, build)) => (rest, Some(build)),
        None => (v, None),
    };
    let (core, pre) = match rest.split_once('-') {
        Some((core, pre)) => (core, Some(pre)),
        None => (rest, None),
    };
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| number(p))
        && pre.is_none_or(|pre| {
            pre.split('.')
                .all(|p| identifier(p) && (!p.bytes().all(|b| b.is_ascii_digit()) || number(p)))
        })
        && build.is_none_or(|b| b.split('.').all(identifier))
}

#[cfg(test)]
mod malformed_tests {
    #[test]
    fn a_malformed_output_s_reason_is_cut_however_much_the_decoder_quotes() {
        let huge = format!(r#"{{"n": {{"$numberLong": "{}"}}}}"#, "9".repeat(100_000));
        let message = super::decode(&huge).unwrap_err();
        assert!(message.len() > 100_000, "the decoder quotes it whole");
        let reason = super::malformed(&message);
        assert!(
            reason.chars().count() < super::MAX_REASON_CHARS + 100,
            "{} characters",
            reason.len()
        );
        assert!(reason.starts_with("its output for this record is malformed"));
    }

    #[test]
    fn an_output_integer_beyond_64_bits_is_refused_not_rounded() {
        let message = super::decode(r#"{"h": {"a": [1, 18446744073709551615]}}"#).unwrap_err();
        assert!(
            message.contains("beyond the 64-bit signed range"),
            "{message}"
        );
        let d = super::decode(r#"{"h": 9223372036854775807, "l": -9223372036854775808}"#).unwrap();
        assert_eq!(d.get_i64("h"), Ok(i64::MAX));
        assert_eq!(d.get_i64("l"), Ok(i64::MIN));
    }
}

#[cfg(test)]
mod version_tests {
    use super::is_version;

    #[test]
    fn semantic_versions_are_told_apart() {
        for ok in [
            "0.1.0",
            "1.10.0",
            "1.0.0-rc.1",
            "1.0.0-alpha-2",
            "1.0.0+build.7",
            "1.1.0-rc.1+b.7",
        ] {
            assert!(is_version(ok), "{ok}");
        }
        for bad in [
            "1.0",
            "v1.0.0",
            "01.0.0",
            "1.0.0-",
            "1.0.0-a..b",
            "1.0.0-01",
            "1.0.0+",
            "1.0.0+a_b",
            "",
        ] {
            assert!(!is_version(bad), "{bad}");
        }
    }
}

/// Whether `name` can name a plugin: lower-case letters, digits and `-`, starting with a
/// letter or digit, so `NAME.toml` is a file in the plugin folder and never a path.
pub fn is_plugin_name(name: &str) -> bool {
    name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Runs `f` (a call into a plugin) where WASI may block: WASI's host calls (a print, a
/// sleep) block on a Tokio runtime, which panics on a thread that is driving async tasks.
/// Called from async code (an import page, a server starting), the call runs on a thread
/// of its own; elsewhere it runs here.
fn off_runtime<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if tokio::runtime::Handle::try_current().is_err() {
        return f();
    }
    std::thread::scope(|s| {
        s.spawn(f)
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// About how many JSON values `text` holds: its separators and openings, counted without
/// parsing (inside strings too, which only overcounts, and does so for inputs and outputs
/// alike).
fn json_values(text: &str) -> usize {
    1 + text
        .bytes()
        .filter(|b| matches!(b, b',' | b'[' | b'{' | b':'))
        .count()
}

/// What the plugin made of one input record.
enum Outcome {
    /// Returned unchanged.
    Keep,
    /// Replaced by these records (none: dropped; several: fanned out).
    Records(Vec<Record>),
    /// Failed, with the plugin's reason.
    Failed(String),
}

/// A record as the plugin receives it: MongoDB relaxed extended JSON, compact, fields in
/// document order, written straight from the BSON (the common types without building a
/// `serde_json::Value` first). The text is what `serde_json` prints for the same value, so
/// a guest that parses and re-prints an unchanged record (as the SDK does) returns the
/// same text.
pub fn encode(d: &Record) -> String {
    let mut out = String::with_capacity(256);
    write_document(&mut out, d);
    out
}

fn write_str(out: &mut String, s: &str) {
    // serde_json's escaping, so both sides agree byte for byte: it escapes only quotes,
    // backslashes and control characters, so most strings are copied as they are.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
    }
}

/// The last millisecond relaxed extended JSON writes as an ISO-8601 date (9999-12-31).
const LAST_ISO_DATE_MS: i64 = 253_402_300_799_999;

fn write_document(out: &mut String, d: &Record) {
    out.push('{');
    for (i, (k, v)) in d.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, k);
        out.push(':');
        write_bson(out, v);
    }
    out.push('}');
}

fn write_bson(out: &mut String, v: &bson::Bson) {
    use bson::Bson;
    use std::fmt::Write;
    match v {
        Bson::Null => out.push_str("null"),
        Bson::Boolean(b) => out.push_str(if *b { "true" } else { "false" }),
        Bson::Int32(n) => {
            let _ = write!(out, "{n}");
        }
        Bson::Int64(n) => {
            let _ = write!(out, "{n}");
        }
        Bson::Double(f) if f.is_finite() => {
            // serde_json's own spelling of the number.
            out.push_str(&serde_json::to_string(f).unwrap_or_else(|_| "null".into()));
        }
        Bson::ObjectId(id) => {
            out.push_str("{\"$oid\":\"");
            out.push_str(&id.to_hex());
            out.push_str("\"}");
        }
        Bson::DateTime(t) if (0..=LAST_ISO_DATE_MS).contains(&t.timestamp_millis()) => {
            match t.try_to_rfc3339_string() {
                Ok(iso) => {
                    out.push_str("{\"$date\":\"");
                    out.push_str(&iso);
                    out.push_str("\"}");
                }
                Err(_) => out.push_str(&v.clone().into_relaxed_extjson().to_string()),
            }
        }
        Bson::String(s) => write_str(out, s),
        Bson::Document(d) => write_document(out, d),
        Bson::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_bson(out, item);
            }
            out.push(']');
        }
        // Dates, ObjectIds, non-finite doubles, binary...: the bson crate's own form.
        other => out.push_str(&other.clone().into_relaxed_extjson().to_string()),
    }
}

/// JSON has one kind of number, so a small `Int64` of the input comes back from a plugin
/// as a number that decodes as `Int32`, and a whole `Double` (`3.0`) as an integer where
/// the plugin's language prints it `3` (JavaScript, Go). Where the output has an `Int32`
/// at a place where its input had an `Int64` or a `Double`, it is widened back: a field
/// does not change type in MongoDB or in a Parquet column because a plugin touched
/// another field of its record. An `Int64` is left alone (a plugin wanting an integer
/// where its input had a double writes `{"$numberLong": ".."}`), and arrays only
/// element by element when their length is unchanged.
fn keep_widths(out: &mut Record, input: &Record) {
    for (k, v) in out.iter_mut() {
        if let Some(was) = input.get(k) {
            widen(v, was);
        }
    }
}

fn widen(v: &mut bson::Bson, was: &bson::Bson) {
    use bson::Bson;
    match (&mut *v, was) {
        (Bson::Int32(n), Bson::Int64(_)) => {
            let n = i64::from(*n);
            *v = Bson::Int64(n);
        }
        (Bson::Int32(n), Bson::Double(_)) => {
            let n = f64::from(*n);
            *v = Bson::Double(n);
        }

        (Bson::Document(d), Bson::Document(w)) => keep_widths(d, w),
        // Element by element only where no element was added or removed: otherwise
        // each later element would take another's type.
        (Bson::Array(a), Bson::Array(w)) if a.len() == w.len() => {
            for (x, y) in a.iter_mut().zip(w) {
                widen(x, y);
            }
        }
        _ => {}
    }
}

/// A plugin's output record: a JSON object (relaxed extended JSON) to a BSON document.
fn decode(text: &str) -> Result<Record, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if !value.is_object() {
        return Err("not a JSON object".into());
    }
    // BSON's integers are 64-bit signed: a larger one would be stored as a rounded double,
    // and two such ids (a 64-bit hash) could become one.
    if sluice_core::integration::beyond_int64(&value) {
        return Err(
            "holds an integer beyond the 64-bit signed range (up to 9223372036854775807), which would be stored rounded: return it as a string".into(),
        );
    }
    match bson::Bson::try_from(value).map_err(|e| e.to_string())? {
        bson::Bson::Document(d) => Ok(d),
        _ => Err("not a document".into()),
    }
}

impl Transform for WasmTransform {
    fn name(&self) -> &str {
        &self.name
    }

    fn apply(&self, batch: Vec<Record>, call: &mut Call) -> Result<Vec<Record>, TransformError> {
        use sluice_core::metrics::{count, observe_seconds};
        let started = Instant::now();
        let records_in = batch.len() as u64;
        // Narrowing a failing batch down costs a call per part: it stops once it has
        // spent a few deadlines, however slowly the plugin fails, or at the caller's
        // limit if that comes first.
        let theirs = call.until;
        let budget = |from: Instant, deadlines: u32| {
            let own = from + deadlines * self.deadline();
            theirs.map_or(own, |theirs| own.min(theirs))
        };
        let skipped_before = call.skipped.len();
        let given = batch.len();
        // A call takes at most RECORDS_PER_CALL records, each part with its deadline and
        // narrowing budget: a deadline timed with `plugin test` (1,000 records by
        // default) holds for an export's batch of 8,192 rows.
        let mut records = batch.into_iter();
        let mut out = Vec::with_capacity(given);
        let mut failure = None;
        let mut offset = 0;
        loop {
            let part: Vec<Record> = records.by_ref().take(RECORDS_PER_CALL).collect();
            if part.is_empty() {
                break;
            }
            let from = Instant::now();
            let until = Until {
                trap: budget(from, SPLIT_BUDGET_DEADLINES),
                memory: budget(from, MEMORY_SPLIT_BUDGET_DEADLINES),
            };
            let size = part.len();
            match self.apply_with_policy(part, call, until, (offset, given)) {
                Ok(done) => out.extend(done),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
            offset += size;
        }
        let result = failure.map_or(Ok(out), Err);
        // Counted once the call succeeded: what a failed call set aside is discarded (the
        // batch is processed again, or the run fails).
        let skipped = call.skipped.len() - skipped_before;
        if result.is_ok() && skipped > 0 {
            self.count_skipped(skipped);
        }
        let plugin = [("plugin", self.name.as_str())];
        let help = "Records through plugins, by plugin and direction (in, out).";
        count(
            "sluice_plugin_records_total",
            help,
            &[plugin[0], ("direction", "in")],
            records_in,
        );
        match &result {
            Ok(out) => count(
                "sluice_plugin_records_total",
                help,
                &[plugin[0], ("direction", "out")],
                out.len() as u64,
            ),
            Err(_) => count_failed_batches(plugin[0].1, 1),
        }
        observe_seconds(
            "sluice_plugin_batch_seconds",
            "Time per batch inside plugins (encoding included), by plugin.",
            &plugin,
            started.elapsed().as_secs_f64(),
        );
        result
    }
}

impl WasmTransform {
    /// Whether a failing batch may be split to narrow the failure down: a batch too big
    /// for the memory cap, its fuel or the output buffer always (budgets per call,
    /// whatever its size: an export's 8,192 rows must not fail where a tracking request's
    /// few pass; each part runs on a fresh instance, its buffer empty); a trap under
    /// dead-letter or skip-batch, so only the records that make the plugin trap are
    /// dead-lettered or dropped, not their whole batch (under fail-run the run stops
    /// anyway, and an isolating caller narrows the chain itself).
    fn splittable(e: &PluginError, policy: FailurePolicy, batch: &[Record]) -> bool {
        batch.len() > 1
            && (matches!(
                e,
                PluginError::Memory { .. }
                    | PluginError::Fuel { .. }
                    | PluginError::Output { .. }
                    | PluginError::Fanout { .. }
            ) || (policy != FailurePolicy::FailRun && matches!(e, PluginError::Trap { .. })))
    }

    fn deadline(&self) -> Duration {
        Duration::from_millis(self.limits.batch_deadline_ms)
    }

    /// Records dropped under `skip-batch`: counted by plugin, beside the warning, so an
    /// operator sees them in `/metrics` and not only in the log.
    fn count_skipped(&self, records: usize) {
        *self
            .skipped_records
            .lock()
            .unwrap_or_else(|p| p.into_inner()) += records as u64;
        sluice_core::metrics::count(
            "sluice_plugin_skipped_records_total",
            "Records dropped under the skip-batch policy: those a plugin failed or trapped on.",
            &[("plugin", self.name.as_str())],
            records as u64,
        );
    }

    /// One batch, with the failure policy applied. Unchanged records are moved from the
    /// input to the output, not copied. Failing batches are split to narrow the failure
    /// down only until `until`.
    fn apply_with_policy(
        &self,
        batch: Vec<Record>,
        call: &mut Call,
        until: Until,
        (offset, given): (usize, usize),
    ) -> Result<Vec<Record>, TransformError> {
        let err = |e: PluginError| TransformError {
            name: self.name.clone(),
            caused_by_input: e.caused_by_input(),
            reason: e.to_string(),
        };
        let outcomes = match self.call(&batch) {
            Ok(outcomes) => outcomes,
            // Split in halves (see `splittable`) until the budget of the failure's kind
            // is spent.
            Err(e)
                if Self::splittable(&e, self.policy, &batch) && Instant::now() < until.of(&e) =>
            {
                let mut second = batch;
                let first: Vec<Record> = second.drain(..second.len() / 2).collect();
                let after = offset + first.len();
                let mut out = self.apply_with_policy(first, call, until, (offset, given))?;
                out.extend(self.apply_with_policy(second, call, until, (after, given))?);
                return Ok(out);
            }
            // A failure that says nothing about the records (a deadline, which depends on
            // the load of the moment, an instance that could not start, output the
            // plugin printed) is no reason to drop or dead-letter them, whatever the
            // policy: the caller fails or answers 503, and the records are processed again.
            Err(e) if !e.caused_by_input() => return Err(err(e)),
            Err(e) => {
                let unnarrowed = Self::splittable(&e, self.policy, &batch);
                // Narrowing stopped unfinished for a caller with a time limit (the
                // tracking endpoint, which answers each event): which of these records
                // fail is unknown, so the batch fails as not the records' fault (503, the
                // client resends) instead of good events being dropped or dead-lettered
                // with the bad ones, which their clients would never send again.
                if unnarrowed && self.policy != FailurePolicy::FailRun && call.until.is_some() {
                    return Err(TransformError {
                        name: self.name.clone(),
                        caused_by_input: false,
                        reason: format!(
                            "{e} (finding which of {} records fail ran out of time)",
                            batch.len()
                        ),
                    });
                }
                let mut reason = e.to_string();
                if unnarrowed {
                    // Some of these records may be good: say so.
                    reason += &format!(
                        " (one of {} records kept together: narrowing the failure down had used its time)",
                        batch.len()
                    );
                }
                return match self.policy {
                    FailurePolicy::SkipBatch => {
                        tracing::warn!(plugin = %self.name, records = batch.len(), error = %reason, "records skipped");
                        call.skipped
                            .extend(batch.into_iter().map(|d| (d, reason.clone())));
                        Ok(Vec::new())
                    }
                    FailurePolicy::DeadLetter => {
                        call.letters
                            .extend(batch.into_iter().map(|d| (d, reason.clone())));
                        Ok(Vec::new())
                    }
                    FailurePolicy::FailRun => Err(err(e)),
                };
            }
        };
        let mut records = Vec::with_capacity(batch.len());
        let mut failed: Vec<(usize, Record, String)> = Vec::new();
        for (index, (input, outcome)) in batch.into_iter().zip(outcomes).enumerate() {
            match outcome {
                Outcome::Keep => records.push(input),
                Outcome::Records(out) => records.extend(out),
                Outcome::Failed(reason) => failed.push((index, input, reason)),
            }
        }
        if failed.is_empty() {
            return Ok(records);
        }
        match self.policy {
            FailurePolicy::DeadLetter => {
                call.letters
                    .extend(failed.into_iter().map(|(_, d, reason)| (d, reason)));
                Ok(records)
            }
            // The call told which records failed: only those are dropped, the others of
            // the batch go on, as under dead-letter.
            FailurePolicy::SkipBatch => {
                tracing::warn!(plugin = %self.name, failed = failed.len(), first = %failed[0].2, "records skipped");
                call.skipped
                    .extend(failed.into_iter().map(|(_, d, reason)| (d, reason)));
                Ok(records)
            }
            FailurePolicy::FailRun => {
                let (index, record, reason) = failed.swap_remove(0);
                Err(err(PluginError::Record {
                    plugin: self.name.clone(),
                    index: offset + index,
                    of: given,
                    event_id: record
                        .get_str(sluice_core::model::event_fields::EVENT_ID)
                        .ok()
                        .map(str::to_string),
                    reason,
                }))
            }
        }
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn the_same_stderr_output_again_is_counted_not_logged() {
        let mut r = Repeats::default();
        let t0 = Instant::now();
        let panic = "thread '<unnamed>' panicked at src/lib.rs:9:5:\nboom\n";
        assert_eq!(r.seen(panic, t0), (true, 0));
        // The parts of a batch split to narrow the panic down.
        for k in 1..=4 {
            assert_eq!(r.seen(panic, t0 + Duration::from_secs(k)), (false, 0));
        }
        // Other output: logged, with the count of what was left out.
        assert_eq!(r.seen("other\n", t0 + Duration::from_secs(5)), (true, 4));
        assert_eq!(r.seen(panic, t0 + Duration::from_secs(6)), (true, 0));
        // The same text once the window has passed is logged again.
        assert_eq!(r.seen(panic, t0 + Duration::from_secs(7)), (false, 0));
        assert_eq!(r.seen(panic, t0 + Duration::from_secs(70)), (true, 1));
    }

    #[test]
    fn a_growth_past_a_memorys_own_maximum_is_not_counted() {
        use wasmtime::ResourceLimiter;
        let mut cap = MemoryCap {
            max_bytes: 1 << 20,
            used: 0,
            hit: false,
        };
        // Refused as wasm refuses it (`-1`), not counted, not a cap hit.
        for _ in 0..10 {
            assert!(!cap.memory_growing(0, 512 << 10, Some(256 << 10)).unwrap());
        }
        assert_eq!((cap.used, cap.hit), (0, false));
        // Growth within both still fits the cap afterwards.
        assert!(cap.memory_growing(0, 1 << 20, None).unwrap());
        assert!(cap.memory_growing(1 << 20, (1 << 20) + 1, None).is_err());
        assert!(cap.hit);
    }

    #[test]
    fn a_failure_while_starting_an_instance_is_not_the_inputs() {
        let trap = PluginError::Trap {
            plugin: "p".into(),
            message: "unreachable".into(),
        };
        assert!(trap.caused_by_input());
        let started = trap.while_starting();
        assert!(!started.caused_by_input());
        assert_eq!(
            started.to_string(),
            "plugin `p` could not start an instance: plugin `p` trapped: unreachable"
        );
        let late = PluginError::Deadline {
            plugin: "p".into(),
            ms: 5,
        };
        let started = late.while_starting();
        assert!(!started.caused_by_input());
        assert_eq!(
            started.to_string(),
            "plugin `p` could not start an instance: its `configure` ran past the deadline of 5 ms"
        );
    }

    #[test]
    fn a_panics_location_and_message_explain_its_trap() {
        let stderr = "starting\nthread '<unnamed>' panicked at src/lib.rs:38:21:\nthe plugin panicked on purpose\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n";
        assert_eq!(
            last_words(stderr),
            "thread '<unnamed>' panicked at src/lib.rs:38:21: the plugin panicked on purpose"
        );
        assert_eq!(last_words("one\ntwo\n\n"), "two");
        assert_eq!(last_words(""), "");
    }

    #[test]
    fn reasons_are_kept_short_and_on_one_line() {
        assert_eq!(plugin_text("fine".into()), "fine");
        assert_eq!(plugin_text("a\nb\tc".into()), "a b c");
        assert_eq!(given_reason(" \n".into()), "(the plugin gave no reason)");
        assert_eq!(given_reason("a\nb".into()), "a b");
        let long = plugin_text("é".repeat(MAX_REASON_CHARS + 5));
        assert!(long.starts_with(&"é".repeat(MAX_REASON_CHARS)));
        assert!(long.ends_with("(5 more characters cut)"), "{long}");
    }
    use wasmtime::ResourceLimiter;

    #[test]
    fn the_memory_cap_is_one_budget_for_all_memories_and_tables() {
        let mut cap = MemoryCap {
            max_bytes: 64 << 20,
            used: 0,
            hit: false,
        };
        assert!(cap.memory_growing(0, 40 << 20, None).unwrap());
        // A second memory of 40 MiB is within its own 64 but not within the plugin's.
        assert!(cap.memory_growing(0, 40 << 20, None).is_err());
        assert!(cap.hit);
        cap.hit = false;
        // Growing the first memory counts only the growth.
        assert!(cap.memory_growing(40 << 20, 50 << 20, None).unwrap());
        // Tables draw on the same budget.
        assert!(cap
            .table_growing(0, (20 << 20) / TABLE_ELEMENT_BYTES, None)
            .is_err());
        assert!(cap.hit);
    }

    #[test]
    fn json_values_are_counted_without_parsing() {
        assert_eq!(json_values("1"), 1);
        assert_eq!(json_values(r#"{"a":1,"b":[1,2]}"#), 7);
    }
}

#[cfg(test)]
mod encoding_tests {
    use super::*;
    use bson::{doc, oid::ObjectId, Bson, DateTime};

    #[test]
    fn a_manifest_may_carry_metadata_but_no_misspelt_field() {
        let base = "name = \"p\"\nversion = \"1.0.0\"\nwasm = \"p.wasm\"\nsha256 = \"00\"\n";
        let with_metadata =
            format!("{base}[metadata]\ndescription = \"tags events\"\nauthors = [\"Ada\"]\n");
        let m: Manifest = toml::from_str(&with_metadata).unwrap();
        assert_eq!(
            m.metadata.unwrap()["description"].as_str(),
            Some("tags events")
        );
        let err = toml::from_str::<Manifest>(&format!("{base}permisions = [\"clocks\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("permisions"), "{err}");
    }

    /// A component importing an (empty) instance under each of `names`, optionally
    /// inside a nested component.
    fn importing(names: &[&str], nested: bool) -> Vec<u8> {
        use wasm_encoder::{
            Component, ComponentImportSection, ComponentTypeRef, ComponentTypeSection,
            InstanceType, NestedComponentSection,
        };
        let mut c = Component::new();
        let mut types = ComponentTypeSection::new();
        types.instance(&InstanceType::new());
        c.section(&types);
        let mut imports = ComponentImportSection::new();
        for name in names {
            imports.import(*name, ComponentTypeRef::Instance(0));
        }
        if nested {
            let mut outer = Component::new();
            outer.section(&NestedComponentSection(&{
                let mut inner = Component::new();
                inner.section(&types);
                inner.section(&imports);
                inner
            }));
            return outer.finish();
        }
        c.section(&imports);
        c.finish()
    }

    #[test]
    fn a_component_importing_wasi_http_is_refused_before_it_is_compiled() {
        let http = importing(
            &["wasi:cli/environment@0.2.0", "wasi:http/types@0.2.10"],
            false,
        );
        let said = unprovided_import(&http).unwrap();
        assert!(
            said.contains("imports `wasi:http/types@0.2.10`")
                && said.contains("--disable http fetch-event"),
            "{said}"
        );
        assert_eq!(
            unprovided_import(&importing(&["wasi:cli/environment@0.2.0"], false)),
            None
        );
        // What a nested component imports, its parent may provide.
        assert_eq!(
            unprovided_import(&importing(&["wasi:http/types@0.2.10"], true)),
            None
        );
        // Through the load, with the reason and the file, before the hash is looked at.
        let dir = std::env::temp_dir().join(format!("sluice-http-import-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("p.wasm"), &http).unwrap();
        std::fs::write(
            dir.join("p.toml"),
            "name = \"p\"\nversion = \"1.0.0\"\nwasm = \"p.wasm\"\nsha256 = \"00\"\n",
        )
        .unwrap();
        let host = PluginHost::new(false).unwrap();
        let err = host
            .load(&dir, "p", serde_json::json!({}), &Grants::default(), None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("`p.wasm` imports `wasi:http/types@0.2.10`"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn integers_where_the_input_had_wider_numbers_are_widened_back() {
        let input = bson::doc! {
            "small": 5i64, "whole": 3.0, "big": 5.0e9, "keep": 7i32, "word": "x",
            "n": { "x": 1.0, "l": [2i64, 4.0] },
        };
        // As a plugin printing whole doubles without a fraction would send it back.
        // `big` as a plugin asking for an integer (`$numberLong`) sends it: left alone.
        let mut out = bson::doc! {
            "small": 5i32, "whole": 3i32, "big": 5_000_000_000i64, "keep": 7i32, "word": 9i32,
            "n": { "x": 1i32, "l": [2i32, 4i32] }, "added": 1i32,
        };
        keep_widths(&mut out, &input);
        assert_eq!(
            out,
            bson::doc! {
                "small": 5i64, "whole": 3.0, "big": 5_000_000_000i64, "keep": 7i32, "word": 9i32,
                "n": { "x": 1.0, "l": [2i64, 4.0] }, "added": 1i32,
            }
        );
        // An array that lost an element is not matched by position.
        let mut shorter = bson::doc! { "n": { "l": [4i32] } };
        keep_widths(&mut shorter, &input);
        assert_eq!(shorter, bson::doc! { "n": { "l": [4i32] } });
    }

    #[test]
    fn direct_encoding_is_the_relaxed_extended_json_of_the_document() {
        let d = doc! {
            "s": "quote \" and \u{e9} and \n", "i32": 7i32, "i64": 1i64 << 40, "f": 2.5,
            "whole": 5.0, "neg": -0.125, "big": 1e300, "t": true, "n": Bson::Null,
            "nested": { "a": [1, "two", { "three": 3.0 }], "empty": {} , "list": [] },
            "at": DateTime::from_millis(1_750_000_000_123), "oid": ObjectId::new(),
            "whole_second": DateTime::from_millis(1_750_000_000_000), "epoch": DateTime::from_millis(0),
            "last_iso": DateTime::from_millis(LAST_ISO_DATE_MS),
            "after_iso": DateTime::from_millis(LAST_ISO_DATE_MS + 1), "before_1970": DateTime::from_millis(-1),
            "tiny": 1e-7, "huge": 1.5e17, "ctl": "tab\there \u{1} and \\ slash",
            "inf": f64::INFINITY, "z_last": 1,
        };
        let direct = encode(&d);
        let reference = Bson::Document(d.clone()).into_relaxed_extjson();
        let parsed: serde_json::Value = serde_json::from_str(&direct).unwrap();
        assert_eq!(parsed, reference, "{direct}");
        // Byte for byte what serde_json prints for the same value, field by field (the
        // host's serde_json sorts keys; the nested document's keys are sorted already).
        for (k, v) in &d {
            let one = doc! { k: v.clone() };
            let printed =
                serde_json::to_string(&Bson::Document(one.clone()).into_relaxed_extjson());
            assert_eq!(encode(&one), printed.unwrap(), "{k}");
        }
        // Field order is the document's.
        assert!(
            direct.starts_with("{\"s\":") && direct.ends_with("\"z_last\":1}"),
            "{direct}"
        );
    }
}
