//! A deliberately misbehaving plugin, used by the tests to show the sandbox holds. It
//! implements the WIT exports directly (not through the SDK) so it can also break the
//! protocol. Config `{"mode": ...}` chooses the misbehaviour:
//! `loop` (never returns), `memory` (allocates without end), `leak` (keeps 3 MiB per
//! record for good), `configure-panic` and `configure-loop` (fail to start), `panic`, `file` (reads
//! /etc/passwd), `socket` (connects to 127.0.0.1:1), `env` (lists the environment),
//! `garbage` (returns records that are not JSON; `garbage-on-bad` only for a record
//! holding the string "bad"), `short` (fewer results than inputs),
//! `sleep` (sleeps a minute in a host call), `fanout` (turns each record into 100,000;
//! `fanout-6` into 6),
//! `clock` (returns the wall clock it sees and how far its monotonic clock moved in a 50 ms
//! sleep), `print` (prints 1,000 lines per record; `print-and-tag` also sets `"printed": true`; `print-forged` prints, to stdout and stderr, a line whose carriage return and escape codes would forge a log line on a terminal), `rename-id` (changes each record's `eventId`), `panic-on-bad` (panics on a record holding the
//! string "bad"), `nul-key-on-bad` (gives a record holding "bad" a `metadata.context` key
//! with a NUL, which BSON cannot store), `break-by-tag` (by a tracking event's `properties.tag`: `bloat` adds 1 MiB, `dollar` a `$` key in
//! `metadata.context`, `retype` makes `timestamp` a word, `dated` adds a date property), `long-reason` (fails each record with a 2 MiB reason holding a newline), `vandal` (drops or blanks an import's key, adds a
//! `$`, dotted or reserved field name, on records titled t1 to t5; both bad names on one
//! titled `two-bad-names`), `pollables` (keeps 600 clock subscriptions per record, never
//! dropped), `batch-size` (sets `batchSize` on each record to the number
//! of records of its call) and `ok` (returns every record). Any other mode fails to
//! configure, naming these.

use std::cell::RefCell;

use sluice_plugin_sdk::bindings::Guest;
use sluice_plugin_sdk::{json, Value};

struct Hostile;

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Every mode (see the module's comment).
const MODES: &[&str] = &[
    "ok",
    "loop",
    "memory",
    "leak",
    "configure-panic",
    "configure-loop",
    "panic",
    "exit",
    "panic-on-bad",
    "file",
    "socket",
    "env",
    "garbage",
    "garbage-on-bad",
    "short",
    "rename-id",
    "clock",
    "sleep",
    "fanout",
    "fanout-6",
    "nul-key-on-bad",
    "break-by-tag",
    "long-reason",
    "vandal",
    "print",
    "print-and-tag",
    "print-forged",
    "pollables",
    "batch-size",
];

#[link(wasm_import_module = "wasi:clocks/monotonic-clock@0.2.0")]
extern "C" {
    /// A pollable ready after `ns` nanoseconds, as its resource handle.
    #[link_name = "subscribe-duration"]
    fn subscribe_duration(ns: i64) -> i32;
}

fn misbehave(mode: &str, record: String) -> Result<Vec<String>, String> {
    match mode {
        "loop" => {
            let mut n: u64 = 0;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        "memory" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "leak" => {
            // 3 MiB kept for good per record: an instance fills its memory cap over
            // a few batches, though each batch alone fits in it.
            std::hint::black_box(Box::leak(vec![1u8; 3 << 20].into_boxed_slice()));
            Ok(vec![record])
        }
        "panic" => panic!("the plugin panicked on purpose"),
        "exit" => std::process::exit(3),
        "panic-on-bad" if record.contains("\"bad\"") => panic!("a record the plugin cannot take"),
        "file" => match std::fs::read_to_string("/etc/passwd") {
            Ok(text) => Ok(vec![json!({ "stolen": text }).to_string()]),
            Err(e) => Err(format!("file access denied: {e}")),
        },
        "socket" => match std::net::TcpStream::connect("127.0.0.1:1") {
            Ok(_) => Ok(vec![json!({ "connected": true }).to_string()]),
            Err(e) => Err(format!("network access denied: {e}")),
        },
        "env" => Ok(vec![json!({ "env": std::env::vars().count() }).to_string()]),
        "garbage" => Ok(vec!["{not json".to_string()]),
        "garbage-on-bad" if record.contains("\"bad\"") => Ok(vec!["{not json".to_string()]),
        "rename-id" => {
            let mut v = serde_json_lite(&record);
            let id = format!("{}-renamed", v["eventId"].as_str().unwrap_or(""));
            v["eventId"] = Value::String(id);
            Ok(vec![v.to_string()])
        }
        "clock" => {
            // What the plugin sees as the wall clock and how far the monotonic clock
            // moves across a 50 ms sleep.
            let wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let start = std::time::Instant::now();
            std::thread::sleep(std::time::Duration::from_millis(50));
            let moved = start.elapsed().as_millis() as u64;
            Ok(vec![json!({ "wallMs": wall, "movedMs": moved }).to_string()])
        }
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_secs(60));
            Ok(vec![record])
        }
        "fanout" => Ok(vec![record; 100_000]),
        "fanout-6" => Ok(vec![record; 6]),
        "nul-key-on-bad" if record.contains("\"bad\"") => {
            let mut v = serde_json_lite(&record);
            v["metadata"]["context"] = json!({ "a\u{0}b": 1 });
            Ok(vec![v.to_string()])
        }
        "break-by-tag" => {
            // Breaks a tracking event by its `properties.tag`.
            let mut v = serde_json_lite(&record);
            match v["properties"]["tag"].as_str().unwrap_or("") {
                "bloat" => v["properties"]["blob"] = json!("x".repeat(1 << 20)),
                "dollar" => v["metadata"]["context"] = json!({ "$where": 1 }),
                "retype" => v["timestamp"] = json!("yesterday"),
                // Not breaking: a date property, as extended JSON.
                "dated" => v["properties"]["seenAt"] = json!({ "$date": "2026-01-02T03:04:05Z" }),
                _ => {}
            }
            Ok(vec![v.to_string()])
        }
        "long-reason" => Err(format!("line one\nforged line {}", "x".repeat(2 << 20))),
        "vandal" => {
            // Breaks the import's rules on records titled t1 to t5, and `two-bad-names`.
            let mut v = serde_json_lite(&record);
            match v["title"].as_str().unwrap_or("") {
                "t1" => {
                    if let Some(o) = v.as_object_mut() {
                        o.remove("thingId");
                    }
                }
                "t2" => v["$where"] = json!(1),
                "t3" => v["a.b"] = json!(1),
                "t4" => v["thingId"] = json!(" "),
                "t5" => v["createdAt"] = json!(1),
                "two-bad-names" => {
                    v["$where"] = json!(1);
                    v["a.b"] = json!(1);
                }
                _ => {}
            }
            Ok(vec![v.to_string()])
        }
        "pollables" => {
            for _ in 0..600 {
                // The handle is never given back: the instance's resource table fills.
                // SAFETY: a WASI 0.2 import taking a duration and returning a handle.
                let _ = unsafe { subscribe_duration(1) };
            }
            Ok(vec![record])
        }
        "print-forged" => {
            let forged = "hello\r2026-01-01T00:00:00Z ERROR sluice: forged \x1b[31mred\x1b[0m";
            println!("{forged}");
            eprintln!("{forged}");
            Ok(vec![record])
        }
        "print" | "print-and-tag" => {
            for i in 0..1000 {
                println!("line {i} of a plugin that prints a lot, padded to sixty bytes");
            }
            if mode == "print" {
                return Ok(vec![record]);
            }
            let mut v = serde_json_lite(&record);
            v["printed"] = Value::Bool(true);
            Ok(vec![v.to_string()])
        }
        _ => Ok(vec![record]),
    }
}

impl Guest for Hostile {
    fn configure(config: String) -> Result<(), String> {
        let v: Value = serde_json_lite(&config);
        let mode = v["mode"].as_str().unwrap_or("ok").to_string();
        match mode.as_str() {
            "configure-panic" => panic!("this plugin cannot start"),
            "configure-loop" => loop {
                std::hint::black_box(&mode);
            },
            known if MODES.contains(&known) => {}
            unknown => {
                return Err(format!(
                    "unknown mode `{unknown}`: one of {}",
                    MODES.join(", ")
                ))
            }
        }
        println!("hostile plugin configured in mode {mode}");
        MODE.with(|m| *m.borrow_mut() = mode);
        Ok(())
    }

    fn transform(batch: Vec<String>) -> Vec<Result<Vec<String>, String>> {
        let mode = MODE.with(|m| m.borrow().clone());
        if mode == "short" {
            return Vec::new();
        }
        if mode == "batch-size" {
            let n = batch.len();
            return batch
                .into_iter()
                .map(|r| {
                    let mut v = serde_json_lite(&r);
                    v["batchSize"] = json!(n);
                    Ok(vec![v.to_string()])
                })
                .collect();
        }
        batch.into_iter().map(|r| misbehave(&mode, r)).collect()
    }
}

fn serde_json_lite(text: &str) -> Value {
    sluice_plugin_sdk::serde_json::from_str(text).unwrap_or(Value::Null)
}

sluice_plugin_sdk::bindings::__export_plugin_world!(Hostile);
