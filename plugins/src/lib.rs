//! The WASM plugin host: third-party transforms as WebAssembly components implementing
//! `plugins/wit/transform.wit`, run by wasmtime in a sandbox.
//!
//! - **Cheap to run**: a component is compiled once when loaded and pre-instantiated
//!   (`InstancePre`); one instance serves batch after batch and is rebuilt only after a
//!   failure. A batch crosses the boundary in one call.
//! - **Impossible to escape**: no files (no preopened directory), no network (TCP, UDP and
//!   name lookups denied), no environment, no arguments, frozen clocks unless the operator
//!   grants `clocks`. Stdout and stderr are captured and logged under the plugin's name.
//! - **Limits with defaults**: a memory cap (a `ResourceLimiter`: growing past it traps), a
//!   wall-clock deadline per batch (epoch interruption), and optional fuel.
//! - **Failures stay in the batch**: a trap, a deadline, the memory cap or output that does
//!   not decode fails that batch with an error naming the plugin and the limit; the
//!   pipeline's [`FailurePolicy`] decides what happens next.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_core::transform::{Record, Transform, TransformError};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

mod bindings {
    wasmtime::component::bindgen!({ path: "wit", world: "plugin" });
}

use bindings::{Plugin, PluginPre};

/// How often the epoch advances; deadlines are counted in these ticks.
const TICK: Duration = Duration::from_millis(5);

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
    #[error("plugin `{plugin}` exceeded its deadline of {ms} ms for a batch")]
    Deadline { plugin: String, ms: u64 },
    #[error("plugin `{plugin}` exceeded its memory cap of {mib} MiB")]
    Memory { plugin: String, mib: u64 },
    #[error("plugin `{plugin}` ran out of fuel ({fuel} units per batch)")]
    Fuel { plugin: String, fuel: u64 },
    #[error("plugin `{plugin}` trapped: {message}")]
    Trap { plugin: String, message: String },
    #[error("plugin `{plugin}` returned malformed output: {message}")]
    Malformed { plugin: String, message: String },
    #[error("plugin `{plugin}` failed record {index}: {reason}")]
    Record {
        plugin: String,
        index: usize,
        reason: String,
    },
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
    /// A description of the config the plugin expects (shown by `sluice plugin test`).
    #[serde(default)]
    pub config_schema: Option<toml::Value>,
}

/// What the operator allows a plugin.
#[derive(Debug, Clone, Default)]
pub struct Grants {
    pub clocks: bool,
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

/// The memory cap: growing linear memory past it traps, and the store remembers it did.
struct MemoryCap {
    max_bytes: usize,
    hit: bool,
}

impl wasmtime::ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.hit = true;
            return Err(wasmtime::Error::msg("memory cap reached"));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: MemoryCap,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
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
    /// Compiled components by sha256: a plugin loaded twice is compiled once.
    compiled: Arc<Mutex<std::collections::HashMap<String, Component>>>,
    fuel: bool,
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
            _ticker: Arc::new(Ticker(stop)),
        })
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
        let manifest_path = dir.join(format!("{name}.toml"));
        let text = std::fs::read_to_string(&manifest_path)
            .map_err(|e| load(format!("`{}`: {e}", manifest_path.display())))?;
        let manifest: Manifest = toml::from_str(&text)
            .map_err(|e| load(format!("`{}`: {e}", manifest_path.display())))?;
        let wasm_path: PathBuf = dir.join(&manifest.wasm);
        let bytes = std::fs::read(&wasm_path)
            .map_err(|e| load(format!("`{}`: {e}", wasm_path.display())))?;
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
                        "asks for `clocks`, which the operator has not granted".into(),
                    ))
                }
                other => return Err(load(format!("asks for unknown permission `{other}`"))),
            }
        }
        let limits = limits.or(manifest.limits.clone()).unwrap_or_default();
        if limits.fuel.is_some() && !self.fuel {
            return Err(load("has a fuel limit but the host meters no fuel".into()));
        }
        let cached = self
            .compiled
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&actual)
            .cloned();
        let component = match cached {
            Some(c) => c,
            None => {
                let c = Component::new(&self.engine, &bytes).map_err(|e| load(format!("{e:#}")))?;
                self.compiled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(actual.clone(), c.clone());
                c
            }
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| load(format!("{e:#}")))?;
        let pre = PluginPre::new(pre).map_err(|e| load(format!("{e:#}")))?;
        let t = WasmTransform {
            name: manifest.name.clone(),
            host: self.clone(),
            pre,
            config: config.to_string(),
            limits,
            clocks: grants.clocks && manifest.permissions.iter().any(|p| p == "clocks"),
            live: Mutex::new(None),
            dead_letters: Mutex::new(Vec::new()),
            policy: FailurePolicy::FailRun,
            skipped_batches: Mutex::new(0),
        };
        let (store, plugin) = t.instantiate()?;
        *t.live.lock().unwrap_or_else(|p| p.into_inner()) = Some((store, plugin));
        Ok(t)
    }
}

/// A loaded plugin, usable as a [`Transform`].
pub struct WasmTransform {
    name: String,
    host: PluginHost,
    pre: PluginPre<HostState>,
    config: String,
    limits: Limits,
    clocks: bool,
    live: Mutex<Option<(Store<HostState>, Plugin)>>,
    /// Records failed under [`FailurePolicy::DeadLetter`], with their reason.
    dead_letters: Mutex<Vec<(Record, String)>>,
    policy: FailurePolicy,
    skipped_batches: Mutex<u64>,
}

/// Output of one batch.
#[derive(Debug, Default)]
pub struct BatchOutput {
    pub records: Vec<Record>,
    /// (index in the batch, reason) of records the plugin failed.
    pub failed: Vec<(usize, String)>,
    pub elapsed: Duration,
}

impl WasmTransform {
    pub fn with_policy(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes the dead letters collected so far.
    pub fn take_dead_letters(&self) -> Vec<(Record, String)> {
        std::mem::take(&mut *self.dead_letters.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn skipped_batches(&self) -> u64 {
        *self
            .skipped_batches
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn instantiate(&self) -> Result<(Store<HostState>, Plugin), PluginError> {
        let stdout = MemoryOutputPipe::new(64 * 1024);
        let stderr = MemoryOutputPipe::new(64 * 1024);
        let mut wasi = WasiCtxBuilder::new();
        wasi.stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }));
        if !self.clocks {
            wasi.wall_clock(Frozen).monotonic_clock(Frozen);
        }
        let state = HostState {
            wasi: wasi.build(),
            table: ResourceTable::new(),
            limits: MemoryCap {
                max_bytes: (self.limits.memory_mib * 1024 * 1024) as usize,
                hit: false,
            },
            stdout,
            stderr,
        };
        let mut store = Store::new(&self.host.engine, state);
        store.limiter(|s| &mut s.limits);
        self.arm(&mut store);
        let plugin = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.classify(e, false))?;
        let configured = plugin.call_configure(&mut store, &self.config);
        self.flush_output(&store);
        let hit = store.data().limits.hit;
        match configured.map_err(|e| self.classify(e, hit))? {
            Ok(()) => Ok((store, plugin)),
            Err(reason) => Err(PluginError::Refused {
                plugin: self.name.clone(),
                reason,
            }),
        }
    }

    /// Sets the batch deadline (and fuel) before a call.
    fn arm(&self, store: &mut Store<HostState>) {
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
        if memory_cap_hit {
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
        let text = format!("{e:#}");
        PluginError::Trap {
            plugin,
            message: text.lines().next().unwrap_or("").to_string(),
        }
    }

    /// Logs what the plugin printed, tagged with its name.
    fn flush_output(&self, store: &Store<HostState>) {
        for (pipe, stream) in [
            (&store.data().stdout, "stdout"),
            (&store.data().stderr, "stderr"),
        ] {
            let bytes = pipe.contents();
            if bytes.is_empty() {
                continue;
            }
            for line in String::from_utf8_lossy(&bytes).lines() {
                tracing::info!(plugin = %self.name, stream, "{line}");
            }
        }
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
                Outcome::Records(records) => out.records.extend(records),
                Outcome::Failed(reason) => out.failed.push((index, reason)),
            }
        }
        out.elapsed = started.elapsed();
        Ok(out)
    }

    /// Calls the plugin on `batch` and decodes what it returned, one outcome per input
    /// record; a malformed output fails the whole batch before anything is used.
    fn call(&self, batch: &[Record]) -> Result<Vec<Outcome>, PluginError> {
        let encoded: Vec<String> = batch.iter().map(encode).collect();
        let mut live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        if live.is_none() {
            *live = Some(self.instantiate()?);
        }
        let Some((store, plugin)) = live.as_mut() else {
            return Err(PluginError::Trap {
                plugin: self.name.clone(),
                message: "no instance".into(),
            });
        };
        self.arm(store);
        let result = plugin.call_transform(&mut *store, &encoded);
        // Pipes are recreated with the instance; drain what this call printed.
        self.flush_output(store);
        let results = match result {
            Ok(r) => r,
            Err(e) => {
                // The instance may be in any state after a trap: rebuild it next time.
                let err = self.classify(e, store.data().limits.hit);
                *live = None;
                return Err(err);
            }
        };
        drop(live);
        if results.len() != batch.len() {
            return Err(PluginError::Malformed {
                plugin: self.name.clone(),
                message: format!("{} results for a batch of {}", results.len(), batch.len()),
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
                Ok(records) => records
                    .iter()
                    .map(|text| {
                        decode(text).map_err(|message| PluginError::Malformed {
                            plugin: self.name.clone(),
                            message: format!("record {index}: {message}"),
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Outcome::Records),
                Err(reason) => Ok(Outcome::Failed(reason)),
            })
            .collect()
    }
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

/// A plugin's output record: a JSON object (relaxed extended JSON) to a BSON document.
fn decode(text: &str) -> Result<Record, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
    if !value.is_object() {
        return Err("not a JSON object".into());
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

    fn apply(&self, batch: Vec<Record>) -> Result<Vec<Record>, TransformError> {
        use sluice_core::metrics::{count, observe_seconds};
        let started = Instant::now();
        let records_in = batch.len() as u64;
        let result = self.apply_with_policy(batch);
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
            Err(_) => count(
                "sluice_plugin_failed_batches_total",
                "Plugin batches that failed the run (trap, limit, bad output, rejected record).",
                &plugin,
                1,
            ),
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
    fn count_skipped_batch(&self) {
        *self
            .skipped_batches
            .lock()
            .unwrap_or_else(|p| p.into_inner()) += 1;
    }

    /// One batch, with the failure policy applied. Unchanged records are moved from the
    /// input to the output, not copied.
    fn apply_with_policy(&self, batch: Vec<Record>) -> Result<Vec<Record>, TransformError> {
        let err = |e: PluginError| TransformError {
            name: self.name.clone(),
            reason: e.to_string(),
        };
        let outcomes = match self.call(&batch) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                return match self.policy {
                    FailurePolicy::SkipBatch => {
                        self.count_skipped_batch();
                        tracing::warn!(plugin = %self.name, error = %e, "batch skipped");
                        Ok(Vec::new())
                    }
                    FailurePolicy::DeadLetter => {
                        let mut dl = self.dead_letters.lock().unwrap_or_else(|p| p.into_inner());
                        let reason = e.to_string();
                        for d in batch {
                            dl.push((d, reason.clone()));
                        }
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
                let mut dl = self.dead_letters.lock().unwrap_or_else(|p| p.into_inner());
                dl.extend(failed.into_iter().map(|(_, d, reason)| (d, reason)));
                Ok(records)
            }
            FailurePolicy::SkipBatch => {
                self.count_skipped_batch();
                tracing::warn!(plugin = %self.name, failed = failed.len(), "batch skipped");
                Ok(Vec::new())
            }
            FailurePolicy::FailRun => {
                let (index, _, reason) = failed.swap_remove(0);
                Err(err(PluginError::Record {
                    plugin: self.name.clone(),
                    index,
                    reason,
                }))
            }
        }
    }
}

#[cfg(test)]
mod encoding_tests {
    use super::*;
    use bson::{doc, oid::ObjectId, Bson, DateTime};

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
