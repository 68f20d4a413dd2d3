//! Export jobs against the real servers: MongoDB -> Parquet -> S3 (and a local folder),
//! read back with the Rust reader and with pyarrow, with faults and archival.

mod support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, TimeUnit, TimestampMicrosecondType};
use bson::{doc, DateTime, Document};
use chrono::{Days, NaiveDate, Utc};
use futures_util::TryStreamExt;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use sluice_connectors::mongo::{EventWriter, WriteStatus, WriterOptions};
use sluice_connectors::objstore::{LocalDir, ObjectStore};
use sluice_connectors::parquet::PartWriterOptions;
use sluice_core::model::{Event, EventMetadata, EventType, ExportJobStatus, ExportJobType};
use sluice_core::transform::{Record, Transform, TransformError};
use sluice_jobs::export::{run_export, ExportContext, ExportRequest};
use support::{TestBucket, TestDb};

fn ms(day: NaiveDate, offset_ms: i64) -> i64 {
    day.and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp_millis()
        + offset_ms
}

fn event(i: usize, day: NaiveDate) -> Event {
    let t = EventType::ALL[i % 5];
    let now = DateTime::now();
    Event {
        id: None,
        event_id: format!("ev-{day}-{i:06}"),
        user_id: format!("u{}", i % 37),
        session_id: format!("s{}-{}", day, i % 101),
        event_type: t,
        timestamp: DateTime::from_millis(ms(day, (i as i64 * 7_919) % 86_400_000)),
        properties: if t == EventType::Purchase {
            doc! { "amount": (i % 50) as f64 + 0.25, "currency": "EUR" }
        } else {
            doc! { "title": format!("page {i}"), "n": i as i64 }
        },
        metadata: EventMetadata {
            device: Some(["desktop", "mobile"][i % 2].into()),
            bot: i % 13 == 0,
            // Every third from a client whose clock ran an hour ahead, its time corrected.
            client_timestamp: (i % 3 == 0).then(|| {
                DateTime::from_millis(ms(day, (i as i64 * 7_919) % 86_400_000) + 3_600_000)
            }),
            sent_at: (i % 3 == 0).then(|| {
                DateTime::from_millis(ms(day, (i as i64 * 7_919) % 86_400_000) + 3_605_000)
            }),
            ..Default::default()
        },
        page_url: Some(format!("/p/{}", i % 9)),
        referrer: None,
        duration: Some(i as i64),
        created_at: now,
        updated_at: now,
    }
}

async fn seed(db: &TestDb, day: NaiveDate, n: usize) -> Vec<Event> {
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    let events: Vec<Event> = (0..n).map(|i| event(i, day)).collect();
    for chunk in events.chunks(1000) {
        // Resent while the writer says `retry` (a busy server under the parallel tests), as
        // a client does.
        let mut pending = chunk.to_vec();
        for round in 0..20 {
            let st = writer.write(&pending).await.unwrap();
            // A resend may find its first attempt stored after all.
            assert!(round > 0 || !st.contains(&WriteStatus::Duplicate), "{st:?}");
            pending = pending
                .into_iter()
                .zip(st)
                .filter(|(_, s)| s.is_retry())
                .map(|(e, _)| e)
                .collect();
            if pending.is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert!(pending.is_empty(), "{} events never stored", pending.len());
    }
    events
}

fn request(kind: ExportJobType, from: NaiveDate, to: NaiveDate) -> ExportRequest {
    ExportRequest {
        kind,
        from,
        to,
        archive_after_days: 90,
        archive_settle: Duration::ZERO,
        scheduled: false,
        late_readers: Vec::new(),
        late_readers_at: None,
        late: false,
    }
}

fn day(offset: i64) -> NaiveDate {
    let today = Utc::now().date_naive();
    if offset >= 0 {
        today + Days::new(offset as u64)
    } else {
        today - Days::new((-offset) as u64)
    }
}

/// `sluice_export_windows_not_exported_total{kind="EVENT_DATA", reason}` (process-wide:
/// other tests may count too).
fn event_data_not_exported(reason: &str) -> f64 {
    sluice_core::metrics::value(
        "sluice_export_windows_not_exported_total",
        &[("kind", "EVENT_DATA"), ("reason", reason)],
    )
}

/// Records the EVENT_DATA schedule's last completed window as day `d`, where `catch_up`
/// goes on from.
async fn event_data_completed_through(db: &TestDb, d: NaiveDate) {
    db.store
        .collection("export_jobs")
        .insert_one(
            doc! { "jobId": "before", "type": "EVENT_DATA", "status": "COMPLETED",
            "windowStart": d.to_string(), "windowEnd": d.to_string() },
        )
        .await
        .unwrap();
}

async fn download(dest: &ObjectStore, key: &str, dir: &std::path::Path) -> PathBuf {
    let bytes = dest.get_bytes(key).await.unwrap();
    let path = dir.join(key.replace('/', "_"));
    std::fs::write(&path, bytes).unwrap();
    path
}

fn temp_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "sluice-export-test-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

async fn job_doc(db: &TestDb, job_id: &str) -> Document {
    db.store
        .collection("export_jobs")
        .find_one(doc! { "jobId": job_id })
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn event_data_round_trips_through_s3_and_pyarrow() {
    let db = TestDb::initialized().await;
    let bucket = TestBucket::new().await;
    let (d1, d2) = (day(-2), day(-1));
    let mut seeded = seed(&db, d1, 1200).await;
    seeded.extend(seed(&db, d2, 800).await);
    let mut ctx = ExportContext::new(db.store.clone(), bucket.object_store());
    ctx.batch_rows = 500;
    let summary = run_export(&ctx, &request(ExportJobType::EventData, d1, d2))
        .await
        .unwrap();
    assert_eq!(summary.rows, 2000);
    assert_eq!(summary.partitions.len(), 2);
    assert_eq!(summary.partitions[0].prefix, format!("EVENT_DATA/dt={d1}"));

    let job = job_doc(&db, &summary.job_id).await;
    assert_eq!(job.get_str("status").unwrap(), "COMPLETED");
    assert_eq!(job.get_i64("recordsProcessed").unwrap(), 2000);
    assert!(job
        .get_str("destination")
        .unwrap()
        .starts_with(&format!("s3://{}/exports/EVENT_DATA", bucket.name)));
    assert!(job.get_datetime("startTime").is_ok() && job.get_datetime("endTime").is_ok());

    let by_id: HashMap<String, &Event> = seeded.iter().map(|e| (e.event_id.clone(), e)).collect();
    let dest = bucket.object_store();
    let dir = temp_dir();
    let mut seen = 0;
    let mut files = Vec::new();
    for p in &summary.partitions {
        let keys: Vec<String> = dest
            .list(&format!("{}/", p.prefix))
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.key)
            .collect();
        assert!(keys.contains(&format!("{}/_SUCCESS", p.prefix)), "{keys:?}");
        let manifest: serde_json::Value = serde_json::from_slice(
            &dest
                .get_bytes(&format!("{}/_manifest.json", p.prefix))
                .await
                .unwrap(),
        )
        .unwrap();
        assert_eq!(manifest["rows"].as_u64(), Some(p.rows));
        assert_eq!(manifest["schema"]["name"], "events");
        let column = |name: &str| {
            manifest["schema"]["columns"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .cloned()
                .unwrap()
        };
        assert_eq!(
            column("timestamp"),
            serde_json::json!({ "name": "timestamp", "type": "timestamp_us_utc", "nullable": false })
        );
        assert_eq!(column("properties")["type"], "json");
        // The symlink manifest names the same files by their full S3 URIs.
        let day = p.prefix.split_once("/dt=").unwrap().1;
        let link = dest
            .get_bytes(&format!(
                "EVENT_DATA/_symlink_format_manifest/dt={day}/manifest"
            ))
            .await
            .unwrap();
        let mut linked: Vec<String> = String::from_utf8(link)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        linked.sort();
        let mut expected: Vec<String> = p
            .files
            .iter()
            .map(|k| format!("s3://{}/exports/{k}", bucket.name))
            .collect();
        expected.sort();
        assert_eq!(linked, expected);
        for key in &p.files {
            let path = download(&dest, key, &dir).await;
            let reader =
                ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap())
                    .unwrap();
            let schema = reader.schema().clone();
            assert_eq!(
                schema.field_with_name("timestamp").unwrap().data_type(),
                &DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
            );
            for batch in reader.build().unwrap() {
                let b = batch.unwrap();
                let ids = b.column_by_name("eventId").unwrap().as_string::<i32>();
                let ts = b
                    .column_by_name("timestamp")
                    .unwrap()
                    .as_primitive::<TimestampMicrosecondType>();
                let types = b.column_by_name("eventType").unwrap().as_string::<i32>();
                let props = b.column_by_name("properties").unwrap().as_string::<i32>();
                let device = b.column_by_name("device").unwrap().as_string::<i32>();
                let bot = b.column_by_name("bot").unwrap().as_boolean();
                let dur = b
                    .column_by_name("duration")
                    .unwrap()
                    .as_primitive::<arrow::datatypes::Int64Type>();
                let amount = b
                    .column_by_name("amount")
                    .unwrap()
                    .as_primitive::<arrow::datatypes::Float64Type>();
                let currency = b.column_by_name("currency").unwrap().as_string::<i32>();
                let micros = |name: &str| {
                    b.column_by_name(name)
                        .unwrap()
                        .as_primitive::<TimestampMicrosecondType>()
                        .clone()
                };
                let (client, sent) = (micros("clientTimestamp"), micros("sentAt"));
                for r in 0..b.num_rows() {
                    let e = by_id[ids.value(r)];
                    // A purchase's amount and currency are typed columns too; other
                    // events have none.
                    let purchase = e.event_type == EventType::Purchase;
                    assert_eq!(
                        amount.is_valid(r).then(|| amount.value(r)),
                        purchase.then(|| e.properties.get_f64("amount").unwrap())
                    );
                    assert_eq!(
                        currency.is_valid(r).then(|| currency.value(r)),
                        purchase.then_some("EUR")
                    );
                    assert_eq!(ts.value(r), e.timestamp.timestamp_millis() * 1000);
                    // The client's own times, where its clock was corrected.
                    let at = |d: Option<DateTime>| d.map(|d| d.timestamp_millis() * 1000);
                    assert_eq!(
                        client.is_valid(r).then(|| client.value(r)),
                        at(e.metadata.client_timestamp)
                    );
                    assert_eq!(
                        sent.is_valid(r).then(|| sent.value(r)),
                        at(e.metadata.sent_at)
                    );
                    assert_eq!(types.value(r), e.event_type.as_str());
                    let json: serde_json::Value = serde_json::from_str(props.value(r)).unwrap();
                    assert_eq!(
                        json,
                        bson::Bson::Document(e.properties.clone()).into_relaxed_extjson()
                    );
                    assert_eq!(Some(device.value(r)), e.metadata.device.as_deref());
                    assert_eq!(bot.value(r), e.metadata.bot);
                    assert_eq!(Some(dur.value(r)), e.duration);
                    seen += 1;
                }
            }
            files.push(path);
        }
    }
    assert_eq!(seen, 2000, "every event exported exactly once");

    // An independent reader: pyarrow.
    let script = r#"
import json, sys
import pyarrow.parquet as pq
rows, types, logical = 0, {}, {}
for path in sys.argv[1:]:
    t = pq.read_table(path)
    rows += t.num_rows
    types = {f.name: str(f.type) for f in t.schema}
    s = pq.ParquetFile(path).schema
    logical = {s.column(i).name: str(s.column(i).logical_type) for i in range(len(s))}
print(json.dumps({"rows": rows, "types": types, "logical": logical}))
"#;
    let report: serde_json::Value =
        serde_json::from_slice(&support::run_python(script, &files)).unwrap();
    assert_eq!(report["rows"], 2000);
    assert_eq!(report["types"]["timestamp"], "timestamp[us, tz=UTC]");
    assert_eq!(report["types"]["eventId"], "string");
    assert_eq!(report["types"]["duration"], "int64");
    assert_eq!(report["types"]["bot"], "bool");
    assert_eq!(report["types"]["amount"], "double");
    assert_eq!(report["types"]["currency"], "string");
    assert_eq!(report["types"]["clientTimestamp"], "timestamp[us, tz=UTC]");
    assert_eq!(report["types"]["sentAt"], "timestamp[us, tz=UTC]");
    // JSON columns carry Parquet's JSON annotation, other text columns STRING.
    assert_eq!(report["logical"]["properties"], "JSON");
    assert_eq!(report["logical"]["context"], "JSON");
    assert_eq!(report["logical"]["eventId"], "String");
    assert_eq!(report["types"]["properties"], "extension<arrow.json>");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_rerun_replaces_the_partition_instead_of_duplicating() {
    let db = TestDb::initialized().await;
    let bucket = TestBucket::new().await;
    let d = day(-1);
    seed(&db, d, 3000).await;
    let mut ctx = ExportContext::new(db.store.clone(), bucket.object_store());
    ctx.part_options = PartWriterOptions {
        target_file_bytes: 20 * 1024,
        row_group_bytes: 8 * 1024,
        zstd_level: 1,
    };
    ctx.batch_rows = 300;
    let first = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    assert!(
        first.partitions[0].files.len() > 1,
        "small target size must split files"
    );
    // Fewer events the second time: the extra parts of the first run must disappear.
    db.store
        .collection("events")
        .delete_many(doc! { "eventId": { "$regex": "[13579]$" } })
        .await
        .unwrap();
    let second = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    assert_eq!(second.rows, 1500);
    let dest = bucket.object_store();
    let listed = dest.list("EVENT_DATA/").await.unwrap();
    let parquet: Vec<&String> = listed
        .iter()
        .map(|o| &o.key)
        .filter(|k| k.ends_with(".parquet"))
        .collect();
    assert_eq!(
        parquet.len(),
        second.partitions[0].files.len(),
        "{parquet:?}"
    );
    let manifest: serde_json::Value = serde_json::from_slice(
        &dest
            .get_bytes(&format!("EVENT_DATA/dt={d}/_manifest.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["rows"], 1500);
    assert_eq!(manifest["jobId"].as_str(), Some(second.job_id.as_str()));
    assert!(dest.list("_staging/").await.unwrap().is_empty());

    // The day's events gone from MongoDB (archived): a rerun reads nothing, and keeps
    // the published partition rather than emptying it.
    db.store
        .collection("events")
        .delete_many(doc! {})
        .await
        .unwrap();
    let third = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    assert_eq!(third.rows, 0);
    let kept: serde_json::Value = serde_json::from_slice(
        &dest
            .get_bytes(&format!("EVENT_DATA/dt={d}/_manifest.json"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(kept, manifest, "the partition is untouched");
    let still = dest.list(&format!("EVENT_DATA/dt={d}/")).await.unwrap();
    assert!(still.iter().any(|o| o.key.ends_with("_SUCCESS")));
    assert_eq!(
        still.iter().filter(|o| o.key.ends_with(".parquet")).count(),
        second.partitions[0].files.len()
    );
}

/// A day read before it ended is published whole, its manifest saying the day was not.
#[tokio::test]
async fn a_manifest_says_whether_its_day_had_ended_when_read() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    // (The day before yesterday: yesterday has not ended 5 minutes after midnight.)
    for d in [day(-2), day(0)] {
        seed(&db, d, 5).await;
    }
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    for kind in [ExportJobType::EventData, ExportJobType::DailyAnalytics] {
        run_export(&ctx, &request(kind, day(-2), day(0)))
            .await
            .unwrap();
        let ended =
            |d: NaiveDate| manifest(&dir, &format!("{}/dt={d}", kind.as_str()))["dayEnded"].clone();
        assert_eq!(ended(day(-2)), serde_json::json!(true), "{kind}");
        assert_eq!(ended(day(0)), serde_json::json!(false), "{kind}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// A TCP proxy to the S3 server that dies after `limit` bytes from the client: the S3
/// server "stops" mid-upload, and every later connection is cut at once.
async fn dying_proxy(limit: u64) -> String {
    let upstream = support::s3_upstream();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let sent = Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut client, _)) = listener.accept().await {
            if sent.load(Ordering::SeqCst) >= limit {
                continue; // dropped: connection closed at once
            }
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let sent = sent.clone();
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = {
                    let s = server;
                    s.into_split()
                };
                let up = async {
                    let mut buf = vec![0u8; 8192];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 >= limit {
                            break;
                        }
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                };
                let down = tokio::io::copy(&mut sr, &mut cw);
                tokio::select! { _ = up => {}, _ = down => {} }
            });
        }
    });
    format!("http://{addr}")
}

/// Wrong credentials fail the run before it reads anything, and the error is S3's own
/// words, not the SDK's dump of the raw response.
#[tokio::test]
async fn a_destination_that_refuses_fails_the_run_before_its_read_in_s3_s_words() {
    let db = TestDb::initialized().await;
    let bucket = TestBucket::new().await;
    let d = day(-1);
    seed(&db, d, 50).await;
    let mut settings = support::s3_settings(&bucket.name);
    settings.secret_key = "not-the-secret".into();
    let wrong = ObjectStore::S3(
        sluice_connectors::objstore::S3Store::connect(&settings)
            .await
            .unwrap(),
    );
    let ctx = ExportContext::new(db.store.clone(), wrong);
    let err = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("check the destination") && err.contains("(HTTP 403)"),
        "{err}"
    );
    // It names the destination it checked.
    assert!(err.contains(&format!("s3 `s3://{}/", bucket.name)), "{err}");
    assert!(
        err.len() < 600 && !err.contains("<?xml") && !err.contains("headers"),
        "{err}"
    );
    assert_eq!(
        ctx.progress
            .rows_read
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn s3_dying_mid_upload_fails_the_run_publishes_nothing_and_a_rerun_succeeds() {
    let counts = || {
        let runs = |status| {
            sluice_core::metrics::value(
                "sluice_export_runs_total",
                &[("kind", "EVENT_DATA"), ("status", status)],
            )
        };
        [
            runs("FAILED"),
            runs("COMPLETED"),
            sluice_core::metrics::value("sluice_export_rows_total", &[("kind", "EVENT_DATA")]),
        ]
    };
    let counted = counts();
    let db = TestDb::initialized().await;
    let bucket = TestBucket::new().await;
    let d = day(-1);
    seed(&db, d, 6000).await;
    let mut settings = support::s3_settings(&bucket.name);
    settings.endpoint = dying_proxy(60 * 1024).await;
    let broken = ObjectStore::S3(
        sluice_connectors::objstore::S3Store::connect(&settings)
            .await
            .unwrap(),
    );
    let mut ctx = ExportContext::new(db.store.clone(), broken);
    ctx.part_options = PartWriterOptions {
        target_file_bytes: 40 * 1024,
        row_group_bytes: 16 * 1024,
        zstd_level: 1,
    };
    ctx.batch_rows = 500;
    let err = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap_err();
    let failed = db
        .store
        .collection("export_jobs")
        .find_one(doc! { "status": "FAILED" })
        .await
        .unwrap()
        .expect("the failed run is recorded");
    assert!(failed.get_str("error").unwrap().contains("s3"), "{failed}");
    assert_eq!(failed.get_str("error").unwrap(), err.to_string());
    let dest = bucket.object_store();
    assert!(
        dest.list("EVENT_DATA/").await.unwrap().is_empty(),
        "nothing may be published"
    );

    ctx.dest = dest.clone();
    let ok = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    assert_eq!(ok.rows, 6000);
    assert!(
        dest.list("_staging/").await.unwrap().is_empty(),
        "the failed run's staging is cleaned"
    );
    let statuses: Vec<String> = db
        .store
        .collection("export_jobs")
        .find(doc! {})
        .sort(doc! { "createdAt": 1 })
        .await
        .unwrap()
        .try_collect::<Vec<Document>>()
        .await
        .unwrap()
        .iter()
        .map(|d| d.get_str("status").unwrap().to_string())
        .collect();
    assert_eq!(statuses, ["FAILED", "COMPLETED"]);
    // Both outcomes are counted for /metrics (other tests of this process add to them,
    // so the counts are compared with theirs when the test began).
    let now = counts();
    assert!(now[0] - counted[0] >= 1.0 && now[1] - counted[1] >= 1.0);
    assert!(now[2] - counted[2] >= 6000.0);
}

#[tokio::test]
async fn archive_deletes_exactly_what_it_exported() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let old = day(-100);
    let recent = day(-10);
    let old_events = seed(&db, old, 700).await;
    seed(&db, recent, 300).await;
    // A claim of the archived day whose event was never stored (its insert failed and the
    // client was answered 503): archiving the day must leave it open.
    let mut lost = event(9_999, old);
    lost.event_id = "never-stored".into();
    db.store
        .collection("event_ids")
        .insert_one(
            doc! { "_id": "never-stored", "ts": lost.timestamp, "at": DateTime::from_millis(0) },
        )
        .await
        .unwrap();
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    // Export transforms (this one skips bots) do not apply to an archive: it is a move.
    ctx.transforms = vec![Arc::new(Shout)];
    // The eventIds are spooled to the work folder and deleted in chunks (11 here).
    let work = temp_dir();
    std::fs::create_dir_all(&work).unwrap();
    ctx.work_dir = work.clone();
    ctx.archive_delete_chunk = 64;
    let summary = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap();
    assert_eq!(summary.rows, 700);
    assert_eq!(summary.deleted, 700);
    assert_eq!(summary.skipped, 0);
    // The delete phase shows in the run's progress, chunk by chunk.
    assert_eq!(
        ctx.progress
            .rows_deleted
            .load(std::sync::atomic::Ordering::Relaxed),
        700
    );
    assert_eq!(
        std::fs::read_dir(&work).unwrap().count(),
        0,
        "the spool and the parts are gone"
    );
    assert_eq!(summary.partitions.len(), 1);
    assert_eq!(summary.partitions[0].prefix, format!("ARCHIVE/dt={old}"));
    // Exactly the archived events' claims are marked (the never-stored one is not).
    let claims = db.store.collection("event_ids");
    assert_eq!(
        claims
            .count_documents(doc! { "archived": true })
            .await
            .unwrap(),
        700
    );
    assert_eq!(
        claims
            .count_documents(doc! { "_id": "never-stored", "archived": true })
            .await
            .unwrap(),
        0
    );
    let events = db.store.collection("events");
    assert_eq!(events.count_documents(doc! {}).await.unwrap(), 300);
    assert_eq!(
        events
            .count_documents(
                doc! { "timestamp": { "$lt": DateTime::from_millis(ms(day(-90), 0)) } }
            )
            .await
            .unwrap(),
        0
    );
    // The daily analytics API refuses the archived day rather than count what is left.
    sluice::server::admin::create_admin_user(
        &db.store,
        "an@x.io",
        "a long enough password",
        sluice_core::model::Role::Analyst,
    )
    .await
    .unwrap();
    let server = support::start_server(&db, |_| {}).await;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    let login: serde_json::Value = client
        .post(format!("{base}/v1/admin/login"))
        .json(&serde_json::json!({ "email": "an@x.io", "password": "a long enough password" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let daily = |from: NaiveDate, to: NaiveDate| {
        client
            .get(format!("{base}/v1/analytics/daily?from={from}&to={to}"))
            .bearer_auth(login["token"].as_str().unwrap())
            .send()
    };
    let r = daily(day(-101), day(-99)).await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "archived_days", "{body}");
    // The days for a program too, and where a range may start.
    assert_eq!(body["days"], serde_json::json!([old.to_string()]), "{body}");
    assert_eq!(
        body["firstAllowed"],
        (old + chrono::Days::new(1)).to_string(),
        "{body}"
    );
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&old.to_string()) && !message.contains(&day(-101).to_string()),
        "{message}"
    );
    // Top pages over archived days would undercount them: refused the same way.
    let r = client
        .get(format!("{base}/v1/analytics/top-pages?from={}", day(-101)))
        .bearer_auth(login["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "archived_days", "{body}");
    // A journey cannot show archived events: its answer names the latest archived day.
    let r = client
        .get(format!("{base}/v1/analytics/journey?userId=v1"))
        .bearer_auth(login["token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()
            .get("x-sluice-archived-through")
            .and_then(|v| v.to_str().ok()),
        Some(old.to_string().as_str())
    );
    // With a later day archived too (by another run, past this range), the first day a
    // range may start at is after it.
    let later = old + chrono::Days::new(2);
    db.store
        .collection("export_jobs")
        .insert_one(doc! {
            "jobId": "another-archive", "type": "ARCHIVE",
            "partitions": [{ "prefix": format!("ARCHIVE/dt={later}") }],
        })
        .await
        .unwrap();
    let r = daily(day(-101), day(-99)).await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["days"], serde_json::json!([old.to_string()]), "{body}");
    assert_eq!(
        body["firstAllowed"],
        (later + chrono::Days::new(1)).to_string(),
        "{body}"
    );
    let r = daily(day(-11), day(-9)).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let rows: serde_json::Value = r.json().await.unwrap();
    // One row per day of the window, the quiet days around the events' day too.
    let counts: Vec<&serde_json::Value> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["events"])
        .collect();
    // Of the day's 300 events, those not flagged as bots (`event` flags every 13th).
    let human = (0..300).filter(|i| i % 13 != 0).count();
    assert_eq!(counts, [0, human, 0], "{rows}");
    server.shutdown().await;

    // Aggregates stay; a resend of an archived event is a duplicate, not a new event.
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    let again = writer.write(&old_events[..5]).await.unwrap();
    assert_eq!(again, vec![WriteStatus::Duplicate; 5]);
    assert_eq!(events.count_documents(doc! {}).await.unwrap(), 300);
    // The resend of the event that was never stored is stored now.
    assert_eq!(
        writer.write(std::slice::from_ref(&lost)).await.unwrap(),
        vec![WriteStatus::Stored]
    );
    events
        .delete_one(doc! { "eventId": "never-stored" })
        .await
        .unwrap();

    // A second run archives nothing new and keeps the first run's files.
    let second = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap();
    assert_eq!((second.rows, second.deleted), (0, 0));
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(format!("ARCHIVE/dt={old}/_manifest.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["rows"], 700);

    // An export of the archived day to another destination (`--dest`, or a destination
    // changed since) is refused too: it would publish the day from what is left.
    let err = event_data_elsewhere_refused(&db, old).await;
    assert!(err.contains("archived"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The error of an EVENT_DATA export of `day` to a folder of its own, which must fail.
async fn event_data_elsewhere_refused(db: &TestDb, day: NaiveDate) -> String {
    let elsewhere = temp_dir();
    let other = ExportContext::new(
        db.store.clone(),
        ObjectStore::Local(LocalDir::new(&elsewhere)),
    );
    let err = run_export(&other, &request(ExportJobType::EventData, day, day))
        .await
        .unwrap_err()
        .to_string();
    let _ = std::fs::remove_dir_all(elsewhere);
    err
}

#[tokio::test]
async fn an_archive_publishes_no_day_whose_events_have_not_settled() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let old = day(-100);
    seed(&db, old, 50).await;
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    // Every event of the day arrived just now, within `archive_settle`.
    let mut settling = request(ExportJobType::Archive, day(0), day(0));
    settling.archive_settle = Duration::from_secs(3600);
    let first = run_export(&ctx, &settling).await.unwrap();
    assert_eq!((first.rows, first.deleted), (0, 0));
    assert_eq!(
        first.deferred,
        [format!(
            "{old}: every event of it arrived in the last 3600 s (archive_settle)"
        )]
    );
    assert!(first.partitions.is_empty(), "{:?}", first.partitions);
    assert!(!dir.join(format!("ARCHIVE/dt={old}")).exists());
    // So the day is not archived: its export runs.
    let exported = run_export(&ctx, &request(ExportJobType::EventData, old, old))
        .await
        .unwrap();
    assert_eq!(exported.rows, 50);
    // (Its events were stored just now, marking the day late a minute ahead: a read
    // after that minute is what ARCHIVE waits for, as the export published the day.)
    let after = DateTime::from_millis(db.store.now().timestamp_millis() + 120_000);
    sluice_jobs::export::late_day_exported(&ctx, ExportJobType::EventData, old, after).await;
    // Once settled, it is archived; an export of it elsewhere is then refused, naming
    // where it was archived to, not the export's own destination.
    let archived = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap();
    assert_eq!((archived.rows, archived.deleted), (50, 50));
    let err = event_data_elsewhere_refused(&db, old).await;
    let archive_dir = dir.join("ARCHIVE").display().to_string();
    assert!(
        err.contains(&format!(
            "the day {old} was archived: their events were moved to {archive_dir} and deleted"
        )),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_archive_that_died_before_deleting_is_finished_not_repeated() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let old = day(-120);
    let seeded = seed(&db, old, 400).await;
    let mut dying = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    dying.fail_before_archive_delete = true;
    assert!(
        run_export(&dying, &request(ExportJobType::Archive, day(0), day(0)))
            .await
            .is_err()
    );
    let events = db.store.collection("events");
    assert_eq!(
        events.count_documents(doc! {}).await.unwrap(),
        400,
        "nothing deleted yet"
    );

    // As if it died between its manifest and its symlink manifest: recovery writes it.
    let link = dir.join(format!(
        "ARCHIVE/_symlink_format_manifest/dt={old}/manifest"
    ));
    std::fs::remove_file(&link).unwrap();
    // And as if it had deleted a first chunk of 100 before it died.
    let first_chunk: Vec<String> = seeded[..100].iter().map(|e| e.event_id.clone()).collect();
    let gone = events
        .delete_many(doc! { "eventId": { "$in": &first_chunk } })
        .await
        .unwrap();
    assert_eq!(gone.deleted_count, 100);
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    ctx.archive_delete_chunk = 64;
    let next = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap();
    assert_eq!(
        next.deleted, 300,
        "the interrupted run's deletion was completed"
    );
    // The interrupted run's record lists the partition with its files from the root, as
    // every partition does, and counts every event it archived as deleted.
    let run = db
        .store
        .collection("export_jobs")
        .find_one(doc! { "partitions.0": { "$exists": true } })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_i64("eventsDeleted").unwrap(), 400, "{run}");
    let listed = run.get_array("partitions").unwrap()[0]
        .as_document()
        .unwrap();
    // An archive adds its files to the day's: a loader reads the manifest for them all.
    assert_eq!(listed.get_str("mode"), Ok("append"), "{run}");
    let files = listed.get_array("files").unwrap().clone();
    assert!(!files.is_empty());
    for file in files {
        let file = file.as_str().unwrap();
        assert!(
            file.starts_with(&format!("ARCHIVE/dt={old}/")) && dir.join(file).is_file(),
            "{file}"
        );
    }
    let prefix = format!("ARCHIVE/dt={old}");
    assert_eq!(symlinked(&dir, &prefix), parquet_files(&dir, &prefix));
    assert_eq!(
        next.rows, 0,
        "and its events were not archived a second time"
    );
    assert_eq!(events.count_documents(doc! {}).await.unwrap(), 0);
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(format!("ARCHIVE/dt={old}/_manifest.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["rows"], 400);
    let pending = db
        .store
        .collection("export_jobs")
        .count_documents(doc! { "pendingDeletes.0": { "$exists": true } })
        .await
        .unwrap();
    assert_eq!(pending, 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_archive_whose_deletes_did_not_all_take_stays_pending_until_they_do() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let old = day(-110);
    seed(&db, old, 300).await;
    let mut missing = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    missing.archive_delete_misses = 7;
    let err = run_export(&missing, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("deleted 293 of the 300") && err.contains("7 of them are still stored"),
        "{err}"
    );
    let events = db.store.collection("events");
    assert_eq!(events.count_documents(doc! {}).await.unwrap(), 7);
    // The day is still pending, not marked done: the next run finishes its deletion
    // instead of archiving the 7 again into a second copy in the partition.
    let jobs = db.store.collection("export_jobs");
    assert_eq!(
        jobs.count_documents(doc! { "pendingDeletes.0": { "$exists": true } })
            .await
            .unwrap(),
        1
    );
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let next = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap();
    assert_eq!((next.deleted, next.rows), (7, 0));
    assert_eq!(events.count_documents(doc! {}).await.unwrap(), 0);
    // The first run counted the 293 it deleted, and the 7 are added: none twice.
    let run = jobs
        .find_one(doc! { "partitions.0": { "$exists": true } })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_i64("eventsDeleted").unwrap(), 300, "{run}");
    let manifest = manifest(&dir, &format!("ARCHIVE/dt={old}"));
    assert_eq!(manifest["rows"], 300, "every event once: {manifest}");
    assert_eq!(
        jobs.count_documents(doc! { "pendingDeletes.0": { "$exists": true } })
            .await
            .unwrap(),
        0
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_document_that_cannot_be_a_row_is_set_aside_not_a_stop_to_the_export() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let d = day(-2);
    seed(&db, d, 50).await;
    // Written by another tool: no eventId, and no userId.
    let at = DateTime::from_millis(ms(d, 7_200_000));
    let events = db.store.collection("events");
    for odd in [
        doc! { "userId": "u", "sessionId": "s", "eventType": "CLICK", "timestamp": at, "createdAt": at, "metadata": { "bot": false } },
        doc! { "eventId": "no-user", "sessionId": "s", "eventType": "CLICK", "timestamp": at, "createdAt": at, "metadata": { "bot": false } },
    ] {
        events.insert_one(odd).await.unwrap();
    }
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    ctx.batch_rows = 16;
    let summary = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    assert_eq!((summary.rows, summary.rejected), (50, 2));
    let letters: Vec<Document> = db
        .store
        .collection("dead_letters")
        .find(doc! { "pipeline": "export:EVENT_DATA" })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let mut reasons: Vec<&str> = letters
        .iter()
        .map(|l| {
            assert_eq!(l.get_str("plugin").unwrap(), "schema");
            l.get_str("reason").unwrap()
        })
        .collect();
    reasons.sort();
    assert!(reasons[0].contains("`eventId`"), "{reasons:?}");
    assert!(reasons[1].contains("`userId`"), "{reasons:?}");
    let job = db
        .store
        .collection("export_jobs")
        .find_one(doc! { "jobId": &summary.job_id })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.get_i64("rowsRejected").unwrap(), 2, "{job}");
    let m = manifest(&dir, &summary.partitions[0].prefix);
    assert_eq!(
        (
            &m["rows"],
            &m["rowsRead"],
            &m["rowsSkipped"],
            &m["rowsDeadLettered"]
        ),
        (
            &serde_json::json!(50),
            &serde_json::json!(52),
            &serde_json::json!(0),
            &serde_json::json!(2)
        ),
        "{m}"
    );
    std::fs::remove_dir_all(dir).unwrap();

    // A run that fails (here its table's folder cannot be written: a file stands where
    // it should be) still records what it set aside: its letters are stored already.
    let blocked = temp_dir();
    std::fs::write(blocked.join("EVENT_DATA"), b"not a folder").unwrap();
    let ctx = ExportContext::new(
        db.store.clone(),
        ObjectStore::Local(LocalDir::new(&blocked)),
    );
    run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap_err();
    let job = db
        .store
        .collection("export_jobs")
        .find_one(doc! { "status": "FAILED" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            job.get_i64("rowsRead").unwrap(),
            job.get_i64("rowsRejected").unwrap(),
            job.get_i64("rowsSkipped").unwrap()
        ),
        (52, 2, 0),
        "{job}"
    );
    std::fs::remove_dir_all(blocked).unwrap();
}

/// Passes batches through unchanged, noting their sizes.
#[derive(Default)]
struct BatchSizes(std::sync::Mutex<Vec<usize>>);
impl Transform for BatchSizes {
    fn name(&self) -> &str {
        "batch-sizes"
    }
    fn apply(
        &self,
        batch: Vec<Record>,
        _: &mut sluice_core::transform::Call,
    ) -> Result<Vec<Record>, TransformError> {
        self.0.lock().unwrap().push(batch.len());
        Ok(batch)
    }
}

#[tokio::test]
async fn batches_of_large_documents_are_cut_by_size_and_lose_nothing() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let d = day(-2);
    let at = DateTime::from_millis(ms(d, 3_600_000));
    // 30 events of about 200 KB each, in batches of about 1 MiB: 6 or so batches where
    // the row count alone would make one.
    let docs: Vec<Document> = (0..30)
        .map(|i| {
            doc! { "eventId": format!("big-{i:02}"), "userId": "u", "sessionId": "s",
            "eventType": "CLICK", "timestamp": at, "createdAt": at,
            "properties": { "blob": format!("{i:02}{}", "x".repeat(200_000)) },
            "metadata": { "bot": false } }
        })
        .collect();
    db.store
        .collection("events")
        .insert_many(docs)
        .await
        .unwrap();
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    ctx.batch_bytes = 1 << 20;
    let sizes = Arc::new(BatchSizes::default());
    ctx.transforms = vec![sizes.clone()];
    let summary = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    assert_eq!(summary.rows, 30);
    // Cut at about 1 MiB (the batch that reaches it included): 5 or 6 documents each.
    let sizes = sizes.0.lock().unwrap().clone();
    assert!(sizes.len() >= 5, "{sizes:?}");
    assert!(sizes.iter().all(|&n| n <= 6), "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 30);
    let mut seen = Vec::new();
    for f in &summary.partitions[0].files {
        let file = std::fs::File::open(dir.join(f)).unwrap();
        for b in ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
        {
            let b = b.unwrap();
            let ids = b.column_by_name("eventId").unwrap().as_string::<i32>();
            let props = b.column_by_name("properties").unwrap().as_string::<i32>();
            for r in 0..b.num_rows() {
                assert!(props.value(r).len() > 200_000);
                seen.push(ids.value(r).to_string());
            }
        }
    }
    seen.sort();
    let expected: Vec<String> = (0..30).map(|i| format!("big-{i:02}")).collect();
    assert_eq!(seen, expected);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_pending_archive_day_whose_files_changed_is_not_archived_again() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let (a, b) = (day(-130), day(-125));
    seed(&db, a, 300).await;
    seed(&db, b, 200).await;
    let mut dying = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    dying.fail_before_archive_delete = true;
    assert!(
        run_export(&dying, &request(ExportJobType::Archive, day(0), day(0)))
            .await
            .is_err()
    );
    // Day A was published, not deleted; then one of its files is damaged.
    let folder = dir.join(format!("ARCHIVE/dt={a}"));
    let manifest_before = std::fs::read(folder.join("_manifest.json")).unwrap();
    let part = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "parquet"))
        .unwrap();
    // Same size, one byte changed: only its content tells.
    let mut bytes = std::fs::read(&part).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&part, bytes).unwrap();

    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let err = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&a.to_string()), "{err}");
    assert!(err.contains("missing or changed"), "{err}");
    let events = db.store.collection("events");
    assert_eq!(
        events.count_documents(doc! {}).await.unwrap(),
        300,
        "day B archived and deleted, day A untouched"
    );
    assert_eq!(
        std::fs::read(folder.join("_manifest.json")).unwrap(),
        manifest_before,
        "day A was not published a second time"
    );
    let b_manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(format!("ARCHIVE/dt={b}/_manifest.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(b_manifest["rows"], 200);
    let jobs = db.store.collection("export_jobs");
    let failed = jobs
        .find_one(doc! { "type": "ARCHIVE", "error": { "$regex": "left these days pending" } })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.get_str("status").unwrap(), "FAILED");
    assert_eq!(
        jobs.count_documents(doc! { "pendingDeletes.0": { "$exists": true } })
            .await
            .unwrap(),
        1,
        "day A stays pending"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// A TCP proxy to the S3 server that flips the first body byte of every answer to a
/// `GET` of a `.parquet` object: a store returning other content than it was given, at
/// the same size.
async fn s3_proxy_corrupting_parquet_reads() -> String {
    use std::sync::atomic::AtomicBool;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = support::s3_upstream();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            // One request at a time on a connection: the answer after a parquet GET is its.
            let corrupt_next = Arc::new(AtomicBool::new(false));
            let flag = corrupt_next.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    let line = String::from_utf8_lossy(&buf[..n.min(2048)]).to_ascii_lowercase();
                    let line = line.lines().next().unwrap_or_default().to_string();
                    if line.starts_with("get ") && line.contains(".parquet") {
                        flag.store(true, Ordering::SeqCst);
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut in_body = false;
                loop {
                    let n = match sr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    if corrupt_next.load(Ordering::SeqCst) {
                        let start = if in_body {
                            Some(0)
                        } else {
                            buf[..n]
                                .windows(4)
                                .position(|w| w == b"\r\n\r\n")
                                .map(|i| i + 4)
                        };
                        match start {
                            Some(at) if at < n => {
                                buf[at] ^= 0xff;
                                corrupt_next.store(false, Ordering::SeqCst);
                                in_body = false;
                            }
                            Some(_) => in_body = true,
                            None => {}
                        }
                    }
                    if cw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

/// Archives a day through a store that returns other parquet bytes than it was given,
/// then through the same store read intact: the error of the first run.
async fn archive_through_a_corrupting_store(checksums: bool) -> String {
    let db = TestDb::initialized().await;
    let bucket = TestBucket::new().await;
    seed(&db, day(-110), 250).await;
    let mut settings = support::s3_settings(&bucket.name);
    settings.endpoint = s3_proxy_corrupting_parquet_reads().await;
    settings.checksums = checksums;
    let corrupting = ObjectStore::S3(
        sluice_connectors::objstore::S3Store::connect(&settings)
            .await
            .unwrap(),
    );
    let ctx = ExportContext::new(db.store.clone(), corrupting);
    let err = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap_err()
        .to_string();
    let events = db.store.collection("events");
    assert_eq!(events.count_documents(doc! {}).await.unwrap(), 250, "{err}");
    let jobs = db.store.collection("export_jobs");
    assert_eq!(
        jobs.count_documents(doc! { "pendingDeletes.0": { "$exists": true } })
            .await
            .unwrap(),
        1,
        "the day stays pending"
    );

    // Read back intact, the next archive checks the day's files by content and finishes it.
    let ctx = ExportContext::new(db.store.clone(), bucket.object_store());
    let next = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap();
    assert_eq!((next.deleted, next.rows), (250, 0), "{next:?}");
    assert_eq!(events.count_documents(doc! {}).await.unwrap(), 0);
    err
}

#[tokio::test]
async fn an_archive_deletes_nothing_when_the_store_returns_other_content_than_it_wrote() {
    // Uploaded without checksums, only the archive's own hash checks what is read back:
    // same size, other bytes, which a size check passed.
    let err = archive_through_a_corrupting_store(false).await;
    assert!(
        err.contains("with sha256") && err.contains("nothing deleted"),
        "{err}"
    );
    // Uploaded with them, the same: the hash is the check (the SDK's CRC32 check on reading
    // is off there, as it cannot check a multipart upload's).
    let err = archive_through_a_corrupting_store(true).await;
    assert!(
        err.contains("with sha256") && err.contains("nothing deleted"),
        "{err}"
    );
}

#[tokio::test]
async fn a_pending_archive_day_is_never_undone_once_its_events_may_be_gone() {
    // Read as "not published", a day's files were undone: the only copy of events the
    // run had already deleted. Two ways to look unpublished: a manifest that does not
    // parse, and one not naming the run's files while some events are gone.
    for unreadable in [true, false] {
        let db = TestDb::initialized().await;
        let dir = temp_dir();
        let a = day(-140);
        seed(&db, a, 300).await;
        let mut dying =
            ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
        dying.fail_before_archive_delete = true;
        assert!(
            run_export(&dying, &request(ExportJobType::Archive, day(0), day(0)))
                .await
                .is_err()
        );
        let prefix = format!("ARCHIVE/dt={a}");
        let files = parquet_files(&dir, &prefix);
        assert!(!files.is_empty());
        let manifest_path = dir.join(&prefix).join("_manifest.json");
        let events = db.store.collection("events");
        if unreadable {
            std::fs::write(&manifest_path, b"{ truncated").unwrap();
        } else {
            let mut m: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&manifest_path).unwrap()).unwrap();
            m["files"] = serde_json::json!([]);
            std::fs::write(&manifest_path, serde_json::to_vec(&m).unwrap()).unwrap();
            let some: Vec<String> = events
                .find(doc! {})
                .limit(10)
                .await
                .unwrap()
                .try_collect::<Vec<bson::Document>>()
                .await
                .unwrap()
                .iter()
                .map(|d| d.get_str("eventId").unwrap().to_string())
                .collect();
            events
                .delete_many(doc! { "eventId": { "$in": &some } })
                .await
                .unwrap();
        }
        let left = events.count_documents(doc! {}).await.unwrap();
        let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
        let err = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("nothing undone"), "{unreadable}: {err}");
        assert_eq!(parquet_files(&dir, &prefix), files, "{unreadable}");
        assert_eq!(events.count_documents(doc! {}).await.unwrap(), left);
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[tokio::test]
async fn runs_whose_process_died_are_failed_and_their_staging_removed() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let jobs = db.store.collection("export_jobs");
    let now = DateTime::now().timestamp_millis();
    // A completed run's staging area is left when its cleanup failed after it published.
    for (id, status, updated) in [
        ("dead-run", "RUNNING", now - 600_000),
        ("live-run", "RUNNING", now - 1_000),
        ("done-run", "COMPLETED", now - 600_000),
        // Left PENDING by a process that died before recording its start.
        ("dead-pending", "PENDING", now - 600_000),
        ("new-pending", "PENDING", now - 1_000),
    ] {
        jobs.insert_one(doc! {
            "jobId": id, "type": "EVENT_DATA", "status": status,
            "updatedAt": DateTime::from_millis(updated),
        })
        .await
        .unwrap();
        let staged = dir.join(format!("_staging/{id}/EVENT_DATA/dt=2026-01-01"));
        std::fs::create_dir_all(&staged).unwrap();
        std::fs::write(staged.join("part-00000.parquet"), b"partial").unwrap();
    }
    let d = day(-1);
    seed(&db, d, 10).await;
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    for id in ["dead-run", "dead-pending"] {
        let dead = job_doc(&db, id).await;
        assert_eq!(dead.get_str("status").unwrap(), "FAILED", "{id}");
        assert!(dead.get_str("error").unwrap().contains("interrupted"));
    }
    assert_eq!(
        job_doc(&db, "new-pending").await.get_str("status").unwrap(),
        "PENDING"
    );
    for ended in ["dead-run", "done-run"] {
        assert!(!dir
            .join(format!("_staging/{ended}"))
            .join("EVENT_DATA/dt=2026-01-01/part-00000.parquet")
            .exists());
    }
    assert_eq!(
        job_doc(&db, "live-run").await.get_str("status").unwrap(),
        "RUNNING"
    );
    assert!(dir
        .join("_staging/live-run/EVENT_DATA/dt=2026-01-01/part-00000.parquet")
        .exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn archives_run_one_at_a_time() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    seed(&db, day(-100), 50).await;
    let locks = db.store.collection("job_locks");
    let later = DateTime::from_millis(DateTime::now().timestamp_millis() + 60_000);
    locks
        .insert_one(doc! { "_id": "ARCHIVE", "owner": "another-run", "expiresAt": later })
        .await
        .unwrap();
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let err = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another-run") && err.contains("one at a time"),
        "{err}"
    );
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! {})
            .await
            .unwrap(),
        50
    );
    // A lease that lapsed (its run died) is taken over.
    locks
        .update_one(
            doc! { "_id": "ARCHIVE" },
            doc! { "$set": { "expiresAt": DateTime::from_millis(0) } },
        )
        .await
        .unwrap();
    let done = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap();
    assert_eq!(done.deleted, 50);
    assert_eq!(locks.count_documents(doc! {}).await.unwrap(), 0, "released");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn daily_analytics_and_user_data_match_mongodb() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let d = day(-1);
    let mut events = seed(&db, d, 900).await;
    // More page views without a page than any page has: counted, but no top page.
    let mut pageless: Vec<Event> = (900..960)
        .map(|i| Event {
            event_type: EventType::PageView,
            page_url: None,
            ..event(i, d)
        })
        .collect();
    // And purchases, for the users' revenue.
    pageless.extend((960..963).map(|i| Event {
        event_type: EventType::Purchase,
        properties: doc! { "amount": 12.34 + i as f64, "currency": "EUR" },
        ..event(i, d)
    }));
    // Purchases in another currency, in none, and one whose amount is no number: the
    // daily revenue is per currency, and counts the last in purchases only.
    // A decimal is no amount (as a visitor's total reads it), and millionths past 2^52
    // round as that total rounds them.
    // A day's total past 2^53 millionths is exact too (nine 1e9 and one just below).
    let mut other: Vec<Document> = vec![
        doc! { "amount": 0.1, "currency": "USD" },
        doc! { "amount": 0.2, "currency": "USD" },
        doc! { "amount": 7_i64 },
        doc! { "amount": "n/a", "currency": "USD" },
        doc! { "amount": 5_000_000_000.000001, "currency": "GBP" },
        doc! { "amount": "1.5".parse::<bson::Decimal128>().unwrap(), "currency": "GBP" },
        doc! { "amount": 999_999_999.999999, "currency": "JPY" },
    ];
    other.extend((0..9).map(|_| doc! { "amount": 1e9, "currency": "JPY" }));
    pageless.extend(other.into_iter().enumerate().map(|(k, properties)| {
        let mut e = Event {
            event_type: EventType::Purchase,
            properties,
            ..event(963 + k, d)
        };
        e.metadata.bot = false;
        e
    }));
    // Crawlers kept flagged (`tracking.bots = "keep"`): more views of one page than any
    // other has, by visitors and sessions of their own; the daily analytics leave them out.
    let bots: Vec<Event> = (0..150)
        .map(|i| {
            let mut e = Event {
                // A crawler's purchase counts no revenue either.
                event_type: if i == 0 {
                    EventType::Purchase
                } else {
                    EventType::PageView
                },
                page_url: Some("/crawled".into()),
                user_id: format!("bot-{}", i % 3),
                session_id: format!("bot-s{}", i % 3),
                ..event(1_000 + i, d)
            };
            e.metadata.bot = true;
            e
        })
        .collect();
    EventWriter::new(db.store.clone(), WriterOptions::default())
        .write(&pageless.iter().chain(&bots).cloned().collect::<Vec<_>>())
        .await
        .unwrap();
    events.extend(pageless);
    // An event another writer stored without a session: an event of the day, but no
    // session of its own.
    db.store
        .collection("events")
        .insert_one(
            doc! { "eventId": "sessionless", "userId": "u1", "eventType": "CLICK",
            "timestamp": DateTime::from_millis(ms(d, 5_000)) },
        )
        .await
        .unwrap();
    let dest = ObjectStore::Local(LocalDir::new(&dir));
    let ctx = ExportContext::new(db.store.clone(), dest.clone());
    let done = run_export(&ctx, &request(ExportJobType::DailyAnalytics, d, d))
        .await
        .unwrap();
    let file = std::fs::File::open(dir.join(&done.partitions[0].files[0])).unwrap();
    let b = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let int = |name: &str| {
        b.column_by_name(name)
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>()
            .value(0)
    };
    // Counted: the events not flagged bot (`event` flags some of the seeded ones too).
    let human: Vec<&Event> = events.iter().filter(|e| !e.metadata.bot).collect();
    assert!(human.len() < events.len());
    let users: std::collections::HashSet<&str> =
        events.iter().map(|e| e.user_id.as_str()).collect();
    let human_users: std::collections::HashSet<&str> =
        human.iter().map(|e| e.user_id.as_str()).collect();
    let sessions: std::collections::HashSet<&str> =
        human.iter().map(|e| e.session_id.as_str()).collect();
    let page_views = human
        .iter()
        .filter(|e| e.event_type == EventType::PageView)
        .count() as i64;
    assert_eq!(int("events"), human.len() as i64 + 1);
    assert!(human_users.contains("u1"));
    assert_eq!(int("uniqueUsers"), human_users.len() as i64);
    assert_eq!(int("uniqueSessions"), sessions.len() as i64);
    assert_eq!(int("pageViews"), page_views);
    // Purchases and revenue per currency, recomputed from the events written (amounts
    // to the millionth, as a visitor's total adds them).
    let mut per_currency: std::collections::BTreeMap<Option<String>, (i64, i64)> =
        Default::default();
    for e in human.iter().filter(|e| e.event_type == EventType::Purchase) {
        let currency = e.properties.get_str("currency").ok().map(str::to_string);
        let entry = per_currency.entry(currency).or_default();
        entry.0 += 1;
        entry.1 += sluice_core::model::number_of(e.properties.get("amount").unwrap())
            .map_or(0, sluice_core::aggregate::revenue_micros);
    }
    assert_eq!(per_currency.len(), 5, "{per_currency:?}");
    assert_eq!(
        int("purchases"),
        per_currency.values().map(|v| v.0).sum::<i64>()
    );
    let revenue = b
        .column_by_name("revenue")
        .unwrap()
        .as_list::<i32>()
        .value(0);
    let revenue = revenue.as_struct();
    let field = |name: &str| {
        revenue
            .column_by_name(name)
            .unwrap()
            .as_primitive::<arrow::datatypes::Int64Type>()
            .clone()
    };
    let (purchases, micros) = (field("purchases"), field("revenueMicros"));
    let doubles = revenue
        .column_by_name("revenue")
        .unwrap()
        .as_primitive::<arrow::datatypes::Float64Type>();
    let currencies = revenue
        .column_by_name("currency")
        .unwrap()
        .as_string::<i32>();
    let exported: std::collections::BTreeMap<Option<String>, (i64, i64)> = (0..revenue.len())
        .map(|i| {
            assert_eq!(doubles.value(i), micros.value(i) as f64 / 1e6);
            (
                currencies
                    .is_valid(i)
                    .then(|| currencies.value(i).to_string()),
                (purchases.value(i), micros.value(i)),
            )
        })
        .collect();
    assert_eq!(exported, per_currency);
    assert_eq!(exported[&Some("USD".to_string())], (3, 300_000));
    assert_eq!(
        exported[&Some("GBP".to_string())],
        (2, 5_000_000_000_000_001)
    );
    assert_eq!(
        exported[&Some("JPY".to_string())],
        (10, 9_999_999_999_999_999)
    );
    let top = b
        .column_by_name("topPages")
        .unwrap()
        .as_list::<i32>()
        .value(0);
    let top = top.as_struct();
    let views = top
        .column_by_name("views")
        .unwrap()
        .as_primitive::<arrow::datatypes::Int64Type>();
    let urls = top.column_by_name("pageUrl").unwrap().as_string::<i32>();
    assert_eq!(urls.null_count(), 0, "no page is no top page");
    let uniques = top
        .column_by_name("uniqueUsers")
        .unwrap()
        .as_primitive::<arrow::datatypes::Int64Type>();
    let exported: Vec<(String, i64, i64)> = (0..top.len())
        .map(|i| (urls.value(i).to_string(), views.value(i), uniques.value(i)))
        .collect();
    // The ten most viewed pages, recomputed from the events written: views and distinct
    // viewers per URL, most viewed first, ties by URL.
    let mut by_page: std::collections::HashMap<&str, (i64, std::collections::HashSet<&str>)> =
        Default::default();
    for e in &human {
        if let (EventType::PageView, Some(url)) = (e.event_type, e.page_url.as_deref()) {
            let entry = by_page.entry(url).or_default();
            entry.0 += 1;
            entry.1.insert(e.user_id.as_str());
        }
    }
    let mut expected: Vec<(String, i64, i64)> = by_page
        .into_iter()
        .map(|(url, (n, viewers))| (url.to_string(), n, viewers.len() as i64))
        .collect();
    expected.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    expected.truncate(10);
    assert!(expected.len() > 1, "{expected:?}");
    assert_eq!(exported, expected);

    let users_run = run_export(&ctx, &request(ExportJobType::UserData, d, d))
        .await
        .unwrap();
    // The crawlers' three profiles are users too.
    assert_eq!(users_run.rows, users.len() as u64 + 3);
    assert_eq!(
        users_run.partitions[0].prefix,
        format!("USER_DATA/dt={}", day(0))
    );
    // The exact revenue (integer micros) beside the double, summing to MongoDB's.
    let mut exported_micros = 0i64;
    for f in &users_run.partitions[0].files {
        let file = std::fs::File::open(dir.join(f)).unwrap();
        for b in ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
        {
            let b = b.unwrap();
            let micros = b
                .column_by_name("totalRevenueMicros")
                .expect("a totalRevenueMicros column")
                .as_primitive::<arrow::datatypes::Int64Type>();
            exported_micros += (0..b.num_rows())
                .filter(|r| micros.is_valid(*r))
                .map(|r| micros.value(r))
                .sum::<i64>();
        }
    }
    let stored_micros: i64 = db
        .store
        .collection("users")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect::<Vec<Document>>()
        .await
        .unwrap()
        .iter()
        .map(|u| u.get_i64("totalRevenueMicros").unwrap_or(0))
        .sum();
    assert!(stored_micros > 0);
    assert_eq!(exported_micros, stored_micros);
    let job = job_doc(&db, &users_run.job_id).await;
    assert_eq!(
        job.get_str("status").unwrap(),
        ExportJobStatus::Completed.as_str()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// Fails every record, as a plugin under `dead-letter` written for another shape of
/// record does.
struct FailEvery;
impl Transform for FailEvery {
    fn name(&self) -> &str {
        "fail-every"
    }
    fn apply(
        &self,
        batch: Vec<Record>,
        call: &mut sluice_core::transform::Call,
    ) -> Result<Vec<Record>, TransformError> {
        call.letters.extend(
            batch
                .into_iter()
                .map(|d| (d, "not an event I know".to_string())),
        );
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn an_export_whose_plugin_fails_every_row_publishes_nothing() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let d = day(-2);
    seed(&db, d, 20).await;
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let first = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    assert_eq!(first.rows, 20);
    ctx.transforms = vec![Arc::new(FailEvery)];
    let err = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "none of the 20 rows read was written: 20 failed and were kept in dead_letters"
        ),
        "{err}"
    );
    // The partition readers see is the first run's, whole.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join(format!("EVENT_DATA/dt={d}/_manifest.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["rows"], 20);
    assert!(dir.join(format!("EVENT_DATA/dt={d}/_SUCCESS")).exists());
    let letters = db
        .store
        .collection("dead_letters")
        .count_documents(doc! { "pipeline": "export:EVENT_DATA" })
        .await
        .unwrap();
    assert_eq!(letters, 20);
    // The run's record counts them.
    let failed = db
        .store
        .collection("export_jobs")
        .find_one(doc! { "status": "FAILED" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(failed.get_i64("rowsDeadLettered"), Ok(20), "{failed}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Drops every record on purpose (a filter, say for bots, that matches them all), or
/// skips every one as a plugin under `skip-batch` skips the batches it fails.
struct LeaveNone {
    skip: bool,
}
impl Transform for LeaveNone {
    fn name(&self) -> &str {
        "leave-none"
    }
    fn apply(
        &self,
        batch: Vec<Record>,
        call: &mut sluice_core::transform::Call,
    ) -> Result<Vec<Record>, TransformError> {
        if self.skip {
            call.skipped
                .extend(batch.into_iter().map(|d| (d, "trapped".to_string())));
        }
        Ok(Vec::new())
    }
}

#[tokio::test]
async fn a_rerun_whose_filter_drops_every_row_replaces_the_partition_but_one_that_fails_them_does_not(
) {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let d = day(-2);
    seed(&db, d, 20).await;
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let first = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    assert_eq!(first.rows, 20);
    let rows = || -> serde_json::Value {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join(format!("EVENT_DATA/dt={d}/_manifest.json"))).unwrap(),
        )
        .unwrap();
        m["rows"].clone()
    };
    // Every batch skipped under `skip-batch`: the rows failed, the run fails, and the
    // published partition stays whole.
    ctx.transforms = vec![Arc::new(LeaveNone { skip: true })];
    let err = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("none of the 20 rows read was written: 20 were skipped"),
        "{err}"
    );
    assert_eq!(rows(), 20);
    // A filter that leaves none: the day now holds none, as the filter means.
    ctx.transforms = vec![Arc::new(LeaveNone { skip: false })];
    let filtered = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    assert_eq!(filtered.rows, 0);
    assert!(!filtered.partitions[0].kept, "{filtered:?}");
    assert_eq!(rows(), 0);
    assert!(dir.join(format!("EVENT_DATA/dt={d}/_SUCCESS")).exists());
    let parquet = std::fs::read_dir(dir.join(format!("EVENT_DATA/dt={d}")))
        .unwrap()
        .filter(|f| {
            f.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".parquet")
        })
        .count();
    assert_eq!(parquet, 0, "the 20 rows' file is removed");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Uppercases `userId`; skips bots (as a plugin under skip-batch skips the records it
/// fails). A native stand-in for a plugin chain.
struct Shout;
impl Transform for Shout {
    fn name(&self) -> &str {
        "shout"
    }
    fn apply(
        &self,
        batch: Vec<Record>,
        call: &mut sluice_core::transform::Call,
    ) -> Result<Vec<Record>, TransformError> {
        let (bots, people): (Vec<Record>, Vec<Record>) = batch.into_iter().partition(|d| {
            d.get_document("metadata")
                .ok()
                .and_then(|m| m.get_bool("bot").ok())
                .unwrap_or(false)
        });
        call.skipped
            .extend(bots.into_iter().map(|d| (d, "a bot".to_string())));
        Ok(people
            .into_iter()
            .map(|mut d| {
                let up = d.get_str("userId").unwrap_or_default().to_uppercase();
                d.insert("userId", up);
                d
            })
            .collect())
    }
}

#[tokio::test]
async fn records_pass_through_the_jobs_transform_chain() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let d = day(-1);
    let events = seed(&db, d, 260).await;
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    ctx.transforms = vec![Arc::new(Shout)];
    let summary = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    let bots = events.iter().filter(|e| e.metadata.bot).count() as u64;
    assert!(bots > 0);
    assert_eq!(summary.rows, 260 - bots);
    // What the chain skipped is counted in the summary and in the run's record.
    assert_eq!(summary.skipped, bots);
    let job = db
        .store
        .collection("export_jobs")
        .find_one(bson::doc! { "jobId": &summary.job_id })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.get_i64("rowsSkipped").unwrap() as u64, bots, "{job}");
    // And in the partition's manifest, for a warehouse reconciling with MongoDB.
    let m = manifest(&dir, &summary.partitions[0].prefix);
    assert_eq!(
        (
            &m["rows"],
            &m["rowsRead"],
            &m["rowsSkipped"],
            &m["rowsDeadLettered"]
        ),
        (
            &serde_json::json!(260 - bots),
            &serde_json::json!(260),
            &serde_json::json!(bots),
            &serde_json::json!(0)
        ),
        "{m}"
    );
    assert_eq!(m["transforms"], serde_json::json!(["shout"]), "{m}");
    let file = std::fs::File::open(dir.join(&summary.partitions[0].files[0])).unwrap();
    for b in ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
    {
        let b = b.unwrap();
        let users = b.column_by_name("userId").unwrap().as_string::<i32>();
        assert!((0..b.num_rows()).all(|r| users.value(r).starts_with('U')));
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Holds batches for `hold` before passing them on unchanged: every batch, or with
/// `first_only` the first one alone.
struct Stall {
    hold: Duration,
    first_only: bool,
    held: std::sync::atomic::AtomicBool,
}
impl Stall {
    fn every(hold: Duration) -> Self {
        Stall {
            hold,
            first_only: false,
            held: Default::default(),
        }
    }
    fn first(hold: Duration) -> Self {
        Stall {
            first_only: true,
            ..Stall::every(hold)
        }
    }
}
impl Transform for Stall {
    fn name(&self) -> &str {
        "stall"
    }
    fn apply(
        &self,
        batch: Vec<Record>,
        _call: &mut sluice_core::transform::Call,
    ) -> Result<Vec<Record>, TransformError> {
        if !self.first_only || !self.held.swap(true, Ordering::Relaxed) {
            std::thread::sleep(self.hold);
        }
        Ok(batch)
    }
}

/// The values of the string column `column` in every Parquet file of the partition
/// folder `prefix`, sorted.
fn sorted_strings(dir: &std::path::Path, prefix: &str, column: &str) -> Vec<String> {
    let mut values = Vec::new();
    for f in parquet_files(dir, prefix) {
        let file = std::fs::File::open(dir.join(prefix).join(f)).unwrap();
        for b in ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
        {
            let b = b.unwrap();
            let col = b.column_by_name(column).unwrap().as_string::<i32>();
            values.extend((0..b.num_rows()).map(|r| col.value(r).to_string()));
        }
    }
    values.sort();
    values
}

/// Runs `kind` for day `d` with its first batch held for 3 s, so that the reader's cursor
/// idles past the server's timeout (1 s in the test), and checks the server closed it
/// (without that the run proves nothing).
async fn export_with_a_stall(
    ctx: &mut ExportContext,
    kind: ExportJobType,
    d: NaiveDate,
) -> sluice_jobs::export::ExportSummary {
    ctx.transforms = vec![Arc::new(Stall::first(Duration::from_secs(3)))];
    let logged = support::Logged::default();
    let guard = tracing::subscriber::set_default(logged.subscriber());
    let summary = run_export(ctx, &request(kind, d, d)).await.unwrap();
    drop(guard);
    assert!(
        logged.text().contains("cursor was closed by the server"),
        "the server did not close the cursor, so the test proves nothing: {}",
        logged.text()
    );
    summary
}

#[tokio::test]
async fn an_export_whose_cursor_the_server_closed_reads_on_without_losing_or_repeating_events() {
    // A server of the test's own, closing cursors idle for a second (MongoDB's default is
    // ten minutes). The transform holds the first batch for 3 s: the reader, its queue to
    // the encoder full, leaves the cursor idle, and its next batch finds it closed.
    let server = support::OwnMongo::start().await;
    server.set_parameter("cursorTimeoutMillis", 1_000).await;
    let store = support::store_via(&server.uri, "export_cursor_reaped").await;
    store.init().await.unwrap();
    let d = day(-1);
    // 6,000 events at 9 instants, 700 at each: the first cursor batch (2,000) ends
    // inside the third instant, whose events the new cursor reads again, maybe in
    // another order.
    let events: Vec<Event> = (0..6_000)
        .map(|i| Event {
            timestamp: DateTime::from_millis(ms(d, 36_000_000 + (i as i64 / 700))),
            ..event(i, d)
        })
        .collect();
    let writer = EventWriter::new(store.clone(), WriterOptions::default());
    for chunk in events.chunks(1_000) {
        let st = writer.write(chunk).await.unwrap();
        assert!(st.iter().all(|s| *s == WriteStatus::Stored), "{st:?}");
    }
    let dir = temp_dir();
    let mut ctx = ExportContext::new(store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    ctx.batch_rows = 100;
    let summary = export_with_a_stall(&mut ctx, ExportJobType::EventData, d).await;
    assert_eq!(summary.rows, 6_000);
    let ids = sorted_strings(&dir, &format!("EVENT_DATA/dt={d}"), "eventId");
    let mut expected: Vec<String> = events.iter().map(|e| e.event_id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected, "each event once");

    // The users snapshot reads on the same way (sorted on `visitorId`).
    let users: Vec<Document> = (0..3_000)
        .map(|i| doc! { "visitorId": format!("v{i:05}"), "totalEvents": 1i64 })
        .collect();
    store.collection("users").insert_many(users).await.unwrap();
    let expected: Vec<String> = {
        let mut v: Vec<String> = store
            .collection("users")
            .distinct("visitorId", doc! {})
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let summary = export_with_a_stall(&mut ctx, ExportJobType::UserData, d).await;
    assert_eq!(summary.rows as usize, expected.len());
    let visitors = sorted_strings(&dir, &summary.partitions[0].prefix, "visitorId");
    assert_eq!(visitors, expected, "each user once");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A run cancelled while it stages a day (SIGTERM, a lost lease) leaves no staging
/// folder behind: its parts would otherwise stay in the work folder until a later run's
/// sweep, a day on.
#[tokio::test]
async fn a_run_cancelled_while_staging_removes_its_staging_folder() {
    let db = TestDb::initialized().await;
    let (dir, work) = (temp_dir(), temp_dir());
    let d = day(-1);
    seed(&db, d, 300).await;
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    ctx.work_dir = work.clone();
    ctx.batch_rows = 50;
    ctx.transforms = vec![Arc::new(Stall::every(Duration::from_millis(300)))];
    let run = tokio::spawn({
        let ctx = ctx.clone();
        async move { run_export(&ctx, &request(ExportJobType::EventData, d, d)).await }
    });
    let staging = || {
        std::fs::read_dir(&work)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with("sluice-work-"))
            .count()
    };
    support::wait_until("the run stages its day", || async { staging() > 0 }).await;
    run.abort();
    assert!(run.await.unwrap_err().is_cancelled());
    support::wait_until("the staging folder is removed", || async { staging() == 0 }).await;
    // And stays removed once the encoder, still holding a batch, finds it gone.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(staging(), 0);
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(work).unwrap();
}

fn small_parts(ctx: &mut ExportContext) {
    ctx.part_options = PartWriterOptions {
        target_file_bytes: 20 * 1024,
        row_group_bytes: 8 * 1024,
        zstd_level: 1,
    };
    ctx.batch_rows = 300;
}

fn manifest(dir: &std::path::Path, prefix: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join(prefix).join("_manifest.json")).unwrap())
        .unwrap()
}

/// The `.parquet` files in a partition folder, sorted.
fn parquet_files(dir: &std::path::Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join(prefix))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".parquet"))
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_publish_killed_midway_is_repaired_by_the_next_export_to_its_destination() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let (d1, d2, d3) = (day(-4), day(-3), day(-2));
    seed(&db, d1, 3000).await; // several parts
    seed(&db, d2, 3000).await;
    seed(&db, d3, 50).await;
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    small_parts(&mut ctx);
    run_export(&ctx, &request(ExportJobType::EventData, d1, d2))
        .await
        .unwrap();
    let parts = |d: NaiveDate| format!("EVENT_DATA/dt={d}");
    let before: Vec<_> = [d1, d2]
        .iter()
        .map(|&d| (manifest(&dir, &parts(d)), parquet_files(&dir, &parts(d))))
        .collect();
    let locks = db.store.collection("job_locks");
    // Reruns whose process is killed after copying one part: nothing is undone, and the
    // partition has an extra part and no `_SUCCESS`.
    let mut dying = ctx.clone();
    dying.die_after_copies = Some(1);
    for d in [d1, d2] {
        let err = run_export(&dying, &request(ExportJobType::EventData, d, d))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("died after 1 files"), "{err}");
        assert!(!dir.join(parts(d)).join("_SUCCESS").exists());
    }
    assert_eq!(parquet_files(&dir, &parts(d1)).len(), before[0].1.len() + 1);
    // The first one's lease lapses (a minute after its process died); the second's has
    // not yet (as if its publish still ran).
    let lapse = |d: NaiveDate| {
        let locks = locks.clone();
        async move {
            locks
                .update_many(
                    doc! { "publishing.prefix": format!("EVENT_DATA/dt={d}") },
                    doc! { "$set": { "expiresAt": DateTime::from_millis(0) } },
                )
                .await
                .unwrap()
                .modified_count
        }
    };
    assert_eq!(lapse(d1).await, 1);
    // (Its symlink manifest lost too: the repair writes it again.)
    let link = dir.join(format!(
        "EVENT_DATA/_symlink_format_manifest/dt={d1}/manifest"
    ));
    std::fs::remove_file(&link).unwrap();
    // The next export to this destination, of another day, repairs the first: its
    // manifest's parts and its `_SUCCESS`, as before the killed rerun.
    run_export(&ctx, &request(ExportJobType::EventData, d3, d3))
        .await
        .unwrap();
    assert_eq!(manifest(&dir, &parts(d1)), before[0].0);
    assert_eq!(parquet_files(&dir, &parts(d1)), before[0].1);
    assert_eq!(symlinked(&dir, &parts(d1)), before[0].1);
    assert!(dir.join(parts(d1)).join("_SUCCESS").exists());
    // The second, still leased, is left alone.
    assert_eq!(parquet_files(&dir, &parts(d2)).len(), before[1].1.len() + 1);
    assert!(!dir.join(parts(d2)).join("_SUCCESS").exists());
    assert_eq!(locks.count_documents(doc! {}).await.unwrap(), 1);
    // Once it lapses, a rerun of its day repairs it and publishes.
    assert_eq!(lapse(d2).await, 1);
    let rerun = run_export(&ctx, &request(ExportJobType::EventData, d2, d2))
        .await
        .unwrap();
    assert_eq!(manifest(&dir, &parts(d2))["jobId"], rerun.job_id.as_str());
    let published: Vec<String> = manifest(&dir, &parts(d2))["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(parquet_files(&dir, &parts(d2)).len(), published.len());
    assert!(dir.join(parts(d2)).join("_SUCCESS").exists());
    assert_eq!(locks.count_documents(doc! {}).await.unwrap(), 0);
    // The repairs made the earlier runs' own parts live again: their records already
    // listed those partitions, and say nothing more.
    let repaired = db
        .store
        .collection("export_jobs")
        .count_documents(doc! { "partitions.repaired": true })
        .await
        .unwrap();
    assert_eq!(repaired, 0);

    // Killed once its manifest is written: the partition is the killed run's. The repair
    // keeps it so, and that run's record, which never recorded its publish, lists it.
    let mut dying = ctx.clone();
    dying.die_after_manifest = true;
    let err = run_export(&dying, &request(ExportJobType::EventData, d3, d3))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("died after its manifest"), "{err}");
    let killed = manifest(&dir, &parts(d3))["jobId"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(lapse(d3).await, 1);
    run_export(&ctx, &request(ExportJobType::EventData, d1, d1))
        .await
        .unwrap();
    assert!(dir.join(parts(d3)).join("_SUCCESS").exists());
    assert_eq!(manifest(&dir, &parts(d3))["jobId"], killed.as_str());
    let record = job_doc(&db, &killed).await;
    let listed: Vec<&Document> = record
        .get_array("partitions")
        .unwrap()
        .iter()
        .filter_map(|p| p.as_document())
        .filter(|p| p.get_str("prefix") == Ok(parts(d3).as_str()))
        .collect();
    assert_eq!(listed.len(), 1, "{record}");
    assert_eq!(listed[0].get_bool("repaired"), Ok(true), "{record}");
    assert_eq!(listed[0].get_i64("rows"), Ok(50), "{record}");
    // Counted in its totals too, as a partition it published.
    assert_eq!(record.get_i64("recordsProcessed"), Ok(50), "{record}");
}

#[tokio::test]
async fn a_publish_failing_to_put_success_back_is_repaired_by_the_next_export() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let (d1, d2) = (day(-3), day(-2));
    seed(&db, d1, 50).await;
    seed(&db, d2, 50).await;
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let mut failing = ctx.clone();
    failing.fail_success_put = true;
    let err = run_export(&failing, &request(ExportJobType::EventData, d1, d1))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("test hook"), "{err}");
    let part = format!("EVENT_DATA/dt={d1}");
    assert!(!dir.join(&part).join("_SUCCESS").exists());
    // Its lease keeps the note (it was dropped with the lock: nothing ever put
    // `_SUCCESS` back unless the same day was exported again).
    let locks = db.store.collection("job_locks");
    let lapsed = locks
        .update_many(
            doc! { "publishing.prefix": &part },
            doc! { "$set": { "expiresAt": DateTime::from_millis(0) } },
        )
        .await
        .unwrap()
        .modified_count;
    assert_eq!(lapsed, 1);
    // The next export to this destination, of another day, completes the partition.
    run_export(&ctx, &request(ExportJobType::EventData, d2, d2))
        .await
        .unwrap();
    assert!(dir.join(&part).join("_SUCCESS").exists());
    assert_eq!(manifest(&dir, &part)["rows"], 50);
    assert_eq!(locks.count_documents(doc! {}).await.unwrap(), 0);
}

#[tokio::test]
async fn a_run_failing_mid_publish_leaves_every_partition_whole_and_says_which_it_replaced() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let (d1, d2, d3) = (day(-3), day(-2), day(-1));
    seed(&db, d1, 50).await; // one part
    seed(&db, d2, 3000).await; // several parts
    seed(&db, d3, 50).await;
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    small_parts(&mut ctx);
    let first = run_export(&ctx, &request(ExportJobType::EventData, d1, d3))
        .await
        .unwrap();
    let before: Vec<(serde_json::Value, Vec<String>)> = [d1, d2, d3]
        .iter()
        .map(|d| {
            let p = format!("EVENT_DATA/dt={d}");
            (manifest(&dir, &p), parquet_files(&dir, &p))
        })
        .collect();
    assert!(before[1].1.len() > 2, "{:?}", before[1].1);

    // A rerun whose storage fails while it copies the second day's parts.
    db.store
        .collection("events")
        .delete_many(doc! { "eventId": { "$regex": "[13579]$" } })
        .await
        .unwrap();
    let mut failing = ctx.clone();
    failing.fail_after_copies = Some(1);
    let err = run_export(&failing, &request(ExportJobType::EventData, d1, d3))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stopped after 1 files"), "{err}");
    let job = db
        .store
        .collection("export_jobs")
        .find_one(doc! { "status": "FAILED" })
        .await
        .unwrap()
        .unwrap();
    let failed_id = job.get_str("jobId").unwrap().to_string();
    // The first day was replaced, and the run's record says so.
    let p1 = format!("EVENT_DATA/dt={d1}");
    assert_eq!(manifest(&dir, &p1)["jobId"], failed_id.as_str());
    assert_eq!(manifest(&dir, &p1)["rows"], 25);
    assert!(dir.join(&p1).join("_SUCCESS").exists());
    // Tables over the symlink manifests read exactly the files the manifests name.
    assert_eq!(symlinked(&dir, &p1), parquet_files(&dir, &p1));
    let partitions = job.get_array("partitions").unwrap();
    assert_eq!(partitions.len(), 1, "{job}");
    let listed = partitions[0].as_document().unwrap();
    assert_eq!(listed.get_str("prefix").unwrap(), p1);
    assert_eq!(listed.get_str("mode").unwrap(), "replace");
    assert!(!job.contains_key("lateEvents"), "{job}");
    assert_eq!(listed.get_array("files").unwrap().len(), 1);
    assert_eq!(job.get_i64("recordsProcessed").unwrap(), 25);
    assert!(job.get_i64("rowsRead").unwrap() >= 25 + 1500);
    // The second day is exactly as the first run left it: its files, its manifest, its
    // `_SUCCESS`; the parts the failed run copied are gone.
    let p2 = format!("EVENT_DATA/dt={d2}");
    assert_eq!(manifest(&dir, &p2), before[1].0);
    assert_eq!(manifest(&dir, &p2)["jobId"], first.job_id.as_str());
    assert_eq!(parquet_files(&dir, &p2), before[1].1);
    assert_eq!(symlinked(&dir, &p2), before[1].1);
    assert!(dir.join(&p2).join("_SUCCESS").exists());
    // The third was never touched.
    let p3 = format!("EVENT_DATA/dt={d3}");
    assert_eq!(manifest(&dir, &p3), before[2].0);
    assert_eq!(parquet_files(&dir, &p3), before[2].1);
    assert!(!dir.join("_staging").exists() || parquet_files_under(&dir.join("_staging")) == 0);

    // A publish that fails after writing its manifest (its answer lost, say) puts the
    // old manifest back with the old files.
    let mut failing = ctx.clone();
    failing.fail_after_manifest = true;
    let err = run_export(&failing, &request(ExportJobType::EventData, d2, d2))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("after its manifest"), "{err}");
    assert_eq!(manifest(&dir, &p2), before[1].0);
    assert_eq!(parquet_files(&dir, &p2), before[1].1);
    assert_eq!(
        symlinked(&dir, &p2),
        before[1].1,
        "the symlink is put back too"
    );
    assert!(dir.join(&p2).join("_SUCCESS").exists());

    // A publish that finds its lock taken by another run before writing its manifest
    // removes only its own copies: the manifest stays the old one, and `_SUCCESS` is left
    // to the run holding the partition (here none: the next run restores it).
    let mut losing = ctx.clone();
    losing.lose_lock_after_copies = true;
    let err = run_export(&losing, &request(ExportJobType::EventData, d2, d2))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no longer holds"), "{err}");
    assert_eq!(manifest(&dir, &p2), before[1].0);
    assert_eq!(parquet_files(&dir, &p2), before[1].1);
    assert!(!dir.join(&p2).join("_SUCCESS").exists());
    db.store
        .collection("job_locks")
        .delete_many(doc! { "owner": "another-run" })
        .await
        .unwrap();

    // A rerun without the fault replaces all three.
    let again = run_export(&ctx, &request(ExportJobType::EventData, d1, d3))
        .await
        .unwrap();
    assert_eq!(again.rows, 25 + 1500 + 25);
    assert_eq!(manifest(&dir, &p2)["rows"], 1500);
    assert_eq!(
        parquet_files(&dir, &p2).len(),
        again.partitions[1].files.len(),
        "the first run's parts were removed"
    );
    assert_eq!(symlinked(&dir, &p2), parquet_files(&dir, &p2));
    std::fs::remove_dir_all(dir).unwrap();
}

/// The file names a partition's symlink manifest lists (each line a full path), sorted;
/// every one of them must exist.
fn symlinked(dir: &std::path::Path, prefix: &str) -> Vec<String> {
    let (kind, day) = prefix.split_once("/dt=").unwrap();
    let link = dir.join(format!("{kind}/_symlink_format_manifest/dt={day}/manifest"));
    let text = std::fs::read_to_string(&link).unwrap();
    let mut names: Vec<String> = text
        .lines()
        .map(|line| {
            // A `file://` URI, not percent-encoded.
            let path = std::path::Path::new(line.strip_prefix("file://").expect(line));
            assert!(path.is_absolute() && path.exists(), "{line}");
            assert_eq!(path.parent().unwrap(), dir.join(prefix).as_path());
            path.file_name().unwrap().to_string_lossy().into_owned()
        })
        .collect();
    names.sort();
    names
}

fn parquet_files_under(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            n += parquet_files_under(&path);
        } else if path.extension().is_some_and(|e| e == "parquet") {
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn an_archive_failing_part_way_archives_no_day_twice() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let (d1, d2) = (day(-121), day(-120));
    seed(&db, d1, 40).await; // one part
    seed(&db, d2, 3000).await; // several parts
    let mut failing = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    small_parts(&mut failing);
    failing.fail_after_copies = Some(1);
    let err = run_export(&failing, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("stopped after 1 files"), "{err}");
    let events = db.store.collection("events");
    // The first day was archived and deleted before the second began.
    assert_eq!(events.count_documents(doc! {}).await.unwrap(), 3000);
    let a1 = format!("ARCHIVE/dt={d1}");
    assert_eq!(manifest(&dir, &a1)["rows"], 40);
    let job = db
        .store
        .collection("export_jobs")
        .find_one(doc! { "type": "ARCHIVE", "status": "FAILED" })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.get_i64("eventsDeleted").unwrap(), 40, "{job}");
    assert_eq!(job.get_array("pendingDeletes").unwrap().len(), 1, "{job}");
    // The second day's unfinished publish was undone.
    let a2 = format!("ARCHIVE/dt={d2}");
    assert!(!dir.join(&a2).exists() || parquet_files(&dir, &a2).is_empty());

    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    small_parts(&mut ctx);
    let next = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap();
    assert_eq!((next.rows, next.deleted), (3000, 3000));
    assert_eq!(events.count_documents(doc! {}).await.unwrap(), 0);
    assert_eq!(
        manifest(&dir, &a1)["rows"],
        40,
        "the first day was not archived again"
    );
    assert_eq!(manifest(&dir, &a2)["rows"], 3000);
    assert_eq!(
        parquet_files(&dir, &a2).len(),
        manifest(&dir, &a2)["files"].as_array().unwrap().len(),
        "no file outside the manifest"
    );
    let pending = db
        .store
        .collection("export_jobs")
        .count_documents(doc! { "pendingDeletes.0": { "$exists": true } })
        .await
        .unwrap();
    assert_eq!(pending, 0);
    assert_eq!(
        job_doc(&db, &next.job_id)
            .await
            .get_i64("eventsDeleted")
            .unwrap(),
        3000
    );

    // Those days' EVENT_DATA and DAILY_ANALYTICS would now be computed from nothing: refused.
    for kind in [ExportJobType::EventData, ExportJobType::DailyAnalytics] {
        let err = run_export(&ctx, &request(kind, d1, d2 + Days::new(1)))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("{d1}, {d2}")) && err.contains("archived"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_run_whose_outcome_the_store_drops_at_first_is_still_recorded_completed() {
    // The connection breaks on the write that records the run COMPLETED (and on the
    // driver's own retry): the run's files are whole, so the record is tried again rather
    // than the run failing and being left to look dead.
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    seed(&db, day(-3), 200).await;
    let (uri, armed, severed, deliver) = support::severing_mongo_proxy(b"COMPLETED").await;
    deliver.store(true, Ordering::SeqCst);
    let store = support::store_via(&uri, &db.name).await;
    let ctx = ExportContext::new(store, ObjectStore::Local(LocalDir::new(&dir)));
    armed.store(true, Ordering::SeqCst);
    let run = tokio::spawn(async move {
        run_export(&ctx, &request(ExportJobType::EventData, day(-3), day(-3))).await
    });
    let cut = severed.clone();
    support::wait_until(
        "the outcome's write cut more often than the driver retries",
        || {
            let cut = cut.clone();
            async move { cut.load(Ordering::SeqCst) >= 3 }
        },
    )
    .await;
    armed.store(false, Ordering::SeqCst);
    let summary = run
        .await
        .unwrap()
        .expect("the run succeeds once its record is written");
    assert_eq!(summary.rows, 200);
    let job = job_doc(&db, &summary.job_id).await;
    assert_eq!(job.get_str("status").unwrap(), "COMPLETED", "{job}");
    assert_eq!(job.get_i64("recordsProcessed").unwrap(), 200, "{job}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn runs_sharing_a_context_report_their_own_bytes() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    seed(&db, day(-3), 300).await;
    seed(&db, day(-2), 300).await;
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let mut summaries = Vec::new();
    for d in [day(-3), day(-2)] {
        summaries.push(
            run_export(&ctx, &request(ExportJobType::EventData, d, d))
                .await
                .unwrap(),
        );
    }
    for s in &summaries {
        let on_disk: u64 = s
            .partitions
            .iter()
            .flat_map(|p| &p.files)
            .map(|f| std::fs::metadata(dir.join(f)).unwrap().len())
            .sum();
        assert!(on_disk > 0);
        assert_eq!(s.bytes, on_disk, "{}", s.job_id);
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_day_that_receives_events_after_its_export_is_published_again_by_the_schedule() {
    use sluice_jobs::export::catch_up;
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let d = day(-3);
    // Marks reaching no further than their write, so the test need not wait them out.
    let writer = EventWriter::new(
        db.store.clone(),
        WriterOptions {
            late_mark_ahead: Duration::ZERO,
            ..Default::default()
        },
    );
    let events: Vec<Event> = (0..40).map(|i| event(i, d)).collect();
    writer.write(&events).await.unwrap();
    let p = format!("EVENT_DATA/dt={d}");
    // The scheduled run of the day publishes its 40 events...
    let first = catch_up(&ctx, ExportJobType::EventData, d, 1, 90)
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(manifest(&dir, &p)["rows"], 40);
    // ...a run with nothing new publishes nothing...
    assert!(catch_up(&ctx, ExportJobType::EventData, d, 1, 90)
        .await
        .unwrap()
        .is_empty());
    // ...then a client's buffered event of that day arrives, and the next run publishes
    // the day again, once.
    let mut late = event(40, d);
    late.event_id = "late-one".into();
    assert_eq!(
        writer.write(std::slice::from_ref(&late)).await.unwrap(),
        vec![WriteStatus::Stored]
    );
    let again = catch_up(&ctx, ExportJobType::EventData, d, 1, 90)
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "the late day, again");
    assert_eq!(manifest(&dir, &p)["rows"], 41);
    assert!(catch_up(&ctx, ExportJobType::EventData, d, 1, 90)
        .await
        .unwrap()
        .is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_late_day_is_marked_before_its_events_are_stored() {
    let db = TestDb::initialized().await;
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    let d = day(-3);
    let events: Vec<Event> = (0..5).map(|i| event(i, d)).collect();
    // A mark the server refuses (a validator no document passes) fails the write before
    // any event is stored, so no stored event can be left without its mark.
    let refuse = |on: bool| {
        let validator = if on {
            doc! { "markedAt": { "$type": "string" } }
        } else {
            doc! {}
        };
        let db = db.store.db().clone();
        async move {
            db.run_command(doc! { "collMod": "late_days", "validator": validator })
                .await
                .unwrap();
        }
    };
    refuse(true).await;
    let err = writer.write(&events).await.unwrap_err().to_string();
    assert!(err.contains("late_days"), "{err}");
    let events_coll = db.store.collection("events");
    assert_eq!(events_coll.count_documents(doc! {}).await.unwrap(), 0);
    // The resend, once marks are accepted, stores every event once and counts it once.
    refuse(false).await;
    assert_eq!(
        writer.write(&events).await.unwrap(),
        vec![WriteStatus::Stored; 5]
    );
    assert_eq!(events_coll.count_documents(doc! {}).await.unwrap(), 5);
    let mark = db
        .store
        .collection("late_days")
        .find_one(doc! { "_id": d.to_string() })
        .await
        .unwrap()
        .expect("the day is marked");
    assert!(mark.get_datetime("markedAt").unwrap() > &DateTime::now());
    let sessions: Vec<Document> = db
        .store
        .collection("sessions")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let counted: i64 = sessions.iter().map(|s| s.get_i64("events").unwrap()).sum();
    assert_eq!(counted, 5, "aggregates applied once");
    // A resend of events already stored marks nothing (its day need not be published
    // again), even from a writer that has no memory of earlier marks.
    db.store
        .collection("late_days")
        .delete_many(doc! {})
        .await
        .unwrap();
    let fresh = EventWriter::new(db.store.clone(), WriterOptions::default());
    assert_eq!(
        fresh.write(&events).await.unwrap(),
        vec![WriteStatus::Duplicate; 5]
    );
    assert_eq!(
        db.store
            .collection("late_days")
            .count_documents(doc! {})
            .await
            .unwrap(),
        0
    );
}

/// An S3 endpoint in front of the test server that loses the answer to the first
/// CompleteMultipartUpload (the upload completes; the connection is cut before its answer
/// comes back) and answers later ones as S3 answers an upload already completed:
/// `404 NoSuchUpload`. The test server itself completes an upload twice. Also how many
/// completions it saw.
async fn s3_proxy_losing_the_first_completion() -> (String, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = support::s3_upstream();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let completions = Arc::new(AtomicU64::new(0));
    let seen = completions.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let (mut from_client, mut from_server) =
                    (vec![0u8; 64 * 1024], vec![0u8; 64 * 1024]);
                let mut losing = false;
                loop {
                    tokio::select! {
                        read = client.read(&mut from_client) => {
                            let n = match read {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let head = String::from_utf8_lossy(&from_client[..n]).to_ascii_lowercase();
                            let first = head.lines().next().unwrap_or_default();
                            if first.starts_with("post ") && first.contains("uploadid=") {
                                if seen.fetch_add(1, Ordering::SeqCst) > 0 {
                                    // The whole request is read before the answer.
                                    let length: usize = head
                                        .lines()
                                        .find_map(|l| l.strip_prefix("content-length:"))
                                        .and_then(|v| v.trim().parse().ok())
                                        .unwrap_or(0);
                                    let mut got = head.find("\r\n\r\n").map_or(0, |i| n - (i + 4));
                                    while got < length {
                                        match client.read(&mut from_client).await {
                                            Ok(0) | Err(_) => return,
                                            Ok(m) => got += m,
                                        }
                                    }
                                    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>NoSuchUpload</Code><Message>The specified upload does not exist.</Message></Error>";
                                    let answer = format!(
                                        "HTTP/1.1 404 Not Found\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                        body.len()
                                    );
                                    let _ = client.write_all(answer.as_bytes()).await;
                                    return;
                                }
                                losing = true;
                            }
                            if server.write_all(&from_client[..n]).await.is_err() {
                                return;
                            }
                        }
                        read = server.read(&mut from_server) => {
                            let n = match read {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if losing {
                                // The completion took; its answer goes with the connection.
                                return;
                            }
                            if client.write_all(&from_server[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), completions)
}

#[tokio::test]
async fn a_multipart_upload_whose_completion_answer_was_lost_is_in_place_not_failed() {
    let bucket = TestBucket::new().await;
    let (endpoint, completions) = s3_proxy_losing_the_first_completion().await;
    let mut settings = support::s3_settings(&bucket.name);
    settings.endpoint = endpoint;
    let dest = ObjectStore::S3(
        sluice_connectors::objstore::S3Store::connect(&settings)
            .await
            .unwrap(),
    );
    let dir = temp_dir();
    let path = dir.join("big.bin");
    // Two parts (16 MiB each at most).
    let bytes: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &bytes).unwrap();
    dest.put_file("big/part.bin", &path).await.unwrap();
    assert!(
        completions.load(Ordering::SeqCst) >= 2,
        "the completion was not sent again, so the test proves nothing"
    );
    assert!(
        bucket
            .object_store()
            .get_bytes("big/part.bin")
            .await
            .unwrap()
            == bytes
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// An S3 endpoint in front of the test server keeping the head (request line and headers,
/// lower-cased) of every request it forwards.
async fn s3_proxy_recording_requests() -> (String, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = support::s3_upstream();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = heads.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            let kept = kept.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match cr.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    // A request's head comes in one write (body pieces never start with a
                    // method and `HTTP/1.1` on their first line).
                    let text = String::from_utf8_lossy(&buf[..n]).to_ascii_lowercase();
                    if let Some((head, _)) = text.split_once("\r\n\r\n") {
                        if head
                            .lines()
                            .next()
                            .is_some_and(|l| l.ends_with(" http/1.1"))
                        {
                            kept.lock().unwrap().push(head.to_string());
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
    (format!("http://{addr}"), heads)
}

#[tokio::test]
async fn exported_objects_carry_the_configured_encryption_and_storage_class() {
    let db = TestDb::initialized().await;
    let bucket = TestBucket::new().await;
    let d = day(-1);
    seed(&db, d, 3000).await;
    let (endpoint, heads) = s3_proxy_recording_requests().await;
    let mut settings = support::s3_settings(&bucket.name);
    settings.endpoint = endpoint;
    settings.server_side_encryption = "AES256".into();
    settings.storage_class = "STANDARD_IA".into();
    settings.expected_bucket_owner = "123456789012".into();
    let dest = ObjectStore::S3(
        sluice_connectors::objstore::S3Store::connect(&settings)
            .await
            .unwrap(),
    );
    let ctx = ExportContext::new(db.store.clone(), dest);
    let summary = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    assert_eq!(summary.rows, 3000);
    // Every object published (the part, staged then copied into place, the manifest,
    // `_SUCCESS`, the symlink manifest) is stored as asked, as S3 reports it.
    let objects = bucket.object_store().list("").await.unwrap();
    assert!(objects.len() >= 4, "{objects:?}");
    for o in &objects {
        let head = bucket
            .store
            .client()
            .head_object()
            .bucket(&bucket.name)
            .key(format!("exports/{}", o.key))
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.server_side_encryption().map(|e| e.as_str()),
            Some("AES256"),
            "{}",
            o.key
        );
        assert_eq!(
            head.storage_class().map(|c| c.as_str()),
            Some("STANDARD_IA"),
            "{}",
            o.key
        );
    }
    // The bucket's owner was named on every request, and the writes asked for both.
    let heads = heads.lock().unwrap().clone();
    assert!(heads.len() > 10, "{heads:?}");
    for h in &heads {
        assert!(
            h.contains("\r\nx-amz-expected-bucket-owner: 123456789012"),
            "{h}"
        );
    }
    let writes: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("put ") && !h.contains("partnumber="))
        .collect();
    assert!(!writes.is_empty());
    for h in writes {
        assert!(
            h.contains("\r\nx-amz-server-side-encryption: aes256"),
            "{h}"
        );
        assert!(h.contains("\r\nx-amz-storage-class: standard_ia"), "{h}");
    }
}

#[tokio::test]
async fn an_upload_stopped_midway_is_aborted_not_left_behind() {
    let bucket = TestBucket::new().await;
    let dest = bucket.object_store();
    let dir = temp_dir();
    let path = dir.join("big.bin");
    std::fs::write(&path, vec![7u8; 96 << 20]).unwrap();
    let client = bucket.store.client().clone();
    let name = bucket.name.clone();
    let open_uploads = || {
        let (client, name) = (client.clone(), name.clone());
        async move {
            client
                .list_multipart_uploads()
                .bucket(&name)
                .send()
                .await
                .unwrap()
                .uploads()
                .len()
        }
    };
    let task = {
        let (dest, path) = (dest.clone(), path.clone());
        tokio::spawn(async move { dest.put_file("big/part.bin", &path).await })
    };
    // Stopped (a run cancelled) once its multipart upload exists.
    let started = std::time::Instant::now();
    while open_uploads().await == 0 {
        assert!(
            !task.is_finished(),
            "the upload ended before it could be stopped"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let stopped = std::time::Instant::now();
    while open_uploads().await > 0 {
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "the stopped upload was not aborted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(dest.get_bytes("big/part.bin").await.is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn replaced_parts_are_kept_for_the_grace_period_then_removed() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let (d, other) = (day(-3), day(-4));
    seed(&db, d, 50).await;
    seed(&db, other, 10).await;
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    ctx.keep_replaced = Duration::from_secs(3600);
    let p = format!("EVENT_DATA/dt={d}");
    let listed = |m: serde_json::Value| -> Vec<String> {
        let mut files: Vec<String> = m["files"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["path"].as_str().unwrap().to_string())
            .collect();
        files.sort();
        files
    };
    run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    let first = parquet_files(&dir, &p);
    // A rerun: the manifest names only its own parts, and the earlier ones stay for the
    // queries that may be reading them.
    run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    let second = listed(manifest(&dir, &p));
    assert!(second.iter().all(|f| !first.contains(f)));
    let mut both: Vec<String> = first.iter().chain(&second).cloned().collect();
    both.sort();
    assert_eq!(parquet_files(&dir, &p), both);
    let retired = db.store.collection("retired_parts");
    assert_eq!(
        retired.count_documents(doc! {}).await.unwrap(),
        first.len() as u64
    );
    // Once the grace period is over, the next run (of any window) removes them.
    retired
        .update_many(
            doc! {},
            doc! { "$set": { "dueAt": DateTime::from_millis(0) } },
        )
        .await
        .unwrap();
    run_export(&ctx, &request(ExportJobType::EventData, other, other))
        .await
        .unwrap();
    assert_eq!(parquet_files(&dir, &p), second);
    assert_eq!(retired.count_documents(doc! {}).await.unwrap(), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn uploads_work_with_checksums_turned_off() {
    let bucket = TestBucket::new().await;
    let mut settings = support::s3_settings(&bucket.name);
    settings.checksums = false;
    let plain = sluice_connectors::objstore::S3Store::connect(&settings)
        .await
        .unwrap();
    let dest = ObjectStore::S3(plain);
    // A multipart file (over 16 MB) and a small object, read back byte for byte.
    let dir = temp_dir();
    let big: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let path = dir.join("big.bin");
    std::fs::write(&path, &big).unwrap();
    dest.put_file("plain/big.bin", &path).await.unwrap();
    dest.put_bytes("plain/small.txt", b"hello".to_vec())
        .await
        .unwrap();
    assert_eq!(dest.get_bytes("plain/big.bin").await.unwrap(), big);
    assert_eq!(dest.get_bytes("plain/small.txt").await.unwrap(), b"hello");
    // Hashed as read back, streamed: what ARCHIVE checks before deleting.
    use sha2::Digest;
    assert_eq!(
        dest.sha256("plain/big.bin").await.unwrap(),
        Some((
            big.len() as u64,
            format!("{:x}", sha2::Sha256::digest(&big))
        ))
    );
    assert_eq!(dest.sha256("plain/never-there").await.unwrap(), None);
    let local = ObjectStore::Local(LocalDir::new(&dir));
    assert_eq!(
        local.sha256("big.bin").await.unwrap(),
        dest.sha256("plain/big.bin").await.unwrap()
    );
    assert_eq!(local.sha256("never-there").await.unwrap(), None);
    // Deletes too: the batch call carries a checksum header whatever the setting, which
    // the stores needing checksums off refuse; one by one, a missing key no error.
    dest.delete(&[
        "plain/big.bin".to_string(),
        "plain/small.txt".to_string(),
        "plain/never-there".to_string(),
    ])
    .await
    .unwrap();
    assert!(dest.list("plain/").await.unwrap().is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

/// ARCHIVE deletes what it wrote, so it writes every field an event has: the Segment
/// API's anonymous id and SDK context and `updatedAt` included (read back by pyarrow). A
/// stored event with a field no column holds is not archived, and its day not deleted.
#[tokio::test]
async fn an_archive_keeps_every_field_and_refuses_an_event_it_could_not_hold() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let old = day(-100);
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    let mut e = event(1, old);
    e.metadata.anonymous_id = Some("anon-42".into());
    e.metadata.context =
        doc! { "campaign": { "source": "newsletter" }, "library": { "name": "analytics.js" } };
    assert_eq!(
        writer.write(std::slice::from_ref(&e)).await.unwrap(),
        vec![WriteStatus::Stored]
    );
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let summary = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap();
    assert_eq!((summary.rows, summary.deleted), (1, 1));
    let files: Vec<String> = std::fs::read_dir(dir.join(format!("ARCHIVE/dt={old}")))
        .unwrap()
        .map(|f| f.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".parquet"))
        .collect();
    let script = r#"
import json, sys
import pyarrow.parquet as pq
row = pq.read_table(sys.argv[1]).to_pylist()[0]
meta = pq.read_schema(sys.argv[1]).metadata[b"sluice.table"].decode()
print(json.dumps({"anonymousId": row["anonymousId"], "context": json.loads(row["context"]),
                  "updatedAt": row["updatedAt"] is not None, "table": meta}))
"#;
    let row: serde_json::Value =
        serde_json::from_slice(&support::run_python(script, &files)).unwrap();
    assert_eq!(row["anonymousId"], "anon-42", "{row}");
    assert_eq!(row["context"]["campaign"]["source"], "newsletter", "{row}");
    assert_eq!(row["updatedAt"], true, "{row}");
    assert_eq!(row["table"], "events/v4", "{row}");

    // Written by another tool, each stops the archive at its day, which stays in MongoDB
    // whole and unpublished, the error naming the event and why:
    // - a field no column holds;
    // - fields the columns have, holding values of other types (a fractional duration, a
    //   flag written as text, a time written as a string, a number for a string): an
    //   EVENT_DATA file would hold them as null, false or converted, so an archive,
    //   which deletes what it wrote, refuses them;
    // - a `createdAt` that is not a date: the archive filter would never select the
    //   event, and the day would be published without it.
    let at = DateTime::from_millis(ms(day(-95), 3_600_000));
    let events = db.store.collection("events");
    let whole = "which its column would not hold whole";
    for (id, odd, why) in [
        (
            "odd-1",
            doc! { "metadata": { "bot": false, "legacyScore": 7 } },
            "metadata.legacyScore",
        ),
        (
            "odd-2",
            doc! { "duration": 12.5 },
            "`duration` holding a double",
        ),
        (
            "odd-3",
            doc! { "metadata": { "bot": "true" } },
            "`metadata.bot` holding text",
        ),
        (
            "odd-4",
            doc! { "updatedAt": "2026-01-01T00:00:00.123456Z" },
            "`updatedAt` holding text",
        ),
        (
            "odd-5",
            doc! { "pageUrl": 42 },
            "`pageUrl` holding a 32-bit integer",
        ),
        (
            "undated-1",
            doc! { "createdAt": "2026-01-01" },
            "no date `createdAt`",
        ),
    ] {
        let mut event = doc! {
            "eventId": id, "userId": "u", "sessionId": "s", "eventType": "CLICK",
            "timestamp": at, "createdAt": at, "metadata": { "bot": false },
        };
        event.extend(odd);
        events.insert_one(event).await.unwrap();
        let err = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(id) && err.contains(why), "{id}: {err}");
        if id.starts_with("odd-") && id != "odd-1" {
            assert!(err.contains(whole), "{id}: {err}");
        }
        assert_eq!(
            events
                .count_documents(doc! { "eventId": id })
                .await
                .unwrap(),
            1,
            "{id} is kept"
        );
        assert!(
            !dir.join(format!("ARCHIVE/dt={}", day(-95)))
                .join("_manifest.json")
                .exists(),
            "{id}: nothing of the day was published"
        );
        events.delete_one(doc! { "eventId": id }).await.unwrap();
    }

    // Several such events in one day: one run names every kind, with how many.
    let base = |id: &str| {
        doc! { "eventId": id, "userId": "u", "sessionId": "s", "eventType": "CLICK",
        "timestamp": at, "createdAt": at, "metadata": { "bot": false } }
    };
    let mut odd = Vec::new();
    for id in ["app-1", "app-2"] {
        let mut d = base(id);
        d.insert("appVersion", "2.3.1");
        odd.push(d);
    }
    let mut scored = base("scored");
    scored.insert("metadata", doc! { "bot": false, "legacyScore": 7 });
    odd.push(scored);
    // Both in one event: both said.
    let mut anonymous = base("x");
    anonymous.remove("eventId");
    anonymous.insert("legacyTag", 1);
    odd.push(anonymous);
    // Values their columns would not hold whole, in the same run: in events of their own,
    // and in one with a field no column holds.
    for (id, duration) in [("dur-1", 1.5), ("dur-2", 2.5)] {
        let mut d = base(id);
        d.insert("duration", duration);
        odd.push(d);
    }
    // (A second later: `app-1` is the first event with `appVersion`, read in time order.)
    let mut both = base("both");
    let later = DateTime::from_millis(at.timestamp_millis() + 1_000);
    both.insert("timestamp", later);
    both.insert("createdAt", later);
    both.insert("pageUrl", 42);
    both.insert("appVersion", "2.4.0");
    odd.push(both);
    events.insert_many(odd).await.unwrap();
    let err = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap_err()
        .to_string();
    for said in [
        "1 event(s) with `metadata.legacyScore`",
        "1 event(s) with no string `eventId`",
        "1 event(s) with `legacyTag`",
        "(the first: event `app-",
        "2 event(s) with `duration` holding a double, which its column would not hold whole (the first: event `dur-",
        "1 event(s) with `pageUrl` holding a 32-bit integer, which its column would not hold whole (the first: event `both`: 42)",
        "3 event(s) with `appVersion`",
    ] {
        assert!(err.contains(said), "{said}: {err}");
    }
    assert_eq!(events.count_documents(doc! {}).await.unwrap(), 7, "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn windows_beyond_catch_up_are_counted_as_not_exported() {
    use sluice_jobs::export::catch_up;
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    // The schedule last completed six days ago; it may catch up two days.
    event_data_completed_through(&db, day(-6)).await;
    let counted = || event_data_not_exported("beyond_catch_up");
    let before = counted();
    let done = catch_up(&ctx, ExportJobType::EventData, day(-1), 2, 90)
        .await
        .unwrap();
    assert_eq!(done.len(), 2, "{done:?}");
    // Days -5, -4 and -3 were left for a backfill (other tests may count too).
    assert!(counted() - before >= 3.0, "{}", counted() - before);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A run publishes again at most `late_days_per_run` days that received late events,
/// oldest first; the others are counted and left to the next runs.
#[tokio::test]
async fn late_days_beyond_the_per_run_cap_wait_for_the_next_runs() {
    use sluice_jobs::export::catch_up;
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    ctx.late_days_per_run = 2;
    // Yesterday's window is done; events then arrive for three earlier days.
    event_data_completed_through(&db, day(-1)).await;
    let writer = EventWriter::new(
        db.store.clone(),
        WriterOptions {
            late_mark_ahead: Duration::ZERO,
            ..Default::default()
        },
    );
    let late = [day(-4), day(-3), day(-2)];
    for (n, d) in late.iter().enumerate() {
        let events: Vec<Event> = (0..=n).map(|i| event(i, *d)).collect();
        writer.write(&events).await.unwrap();
    }
    let waiting = || event_data_not_exported("late_days_beyond_per_run");
    let published = |done: &[sluice_jobs::export::ExportSummary]| -> Vec<String> {
        done.iter()
            .map(|s| s.partitions[0].prefix.clone())
            .collect()
    };
    let before = waiting();
    let first = catch_up(&ctx, ExportJobType::EventData, day(-1), 7, 90)
        .await
        .unwrap();
    assert_eq!(
        published(&first),
        [
            format!("EVENT_DATA/dt={}", late[0]),
            format!("EVENT_DATA/dt={}", late[1])
        ]
    );
    // The third day was counted as waiting (other tests may count too: at least it).
    assert!(waiting() - before >= 1.0);
    let second = catch_up(&ctx, ExportJobType::EventData, day(-1), 7, 90)
        .await
        .unwrap();
    assert_eq!(published(&second), [format!("EVENT_DATA/dt={}", late[2])]);
    assert_eq!(
        manifest(&dir, &format!("EVENT_DATA/dt={}", late[2]))["rows"],
        3
    );
    let third = catch_up(&ctx, ExportJobType::EventData, day(-1), 7, 90)
        .await
        .unwrap();
    assert!(third.is_empty(), "{third:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// Which late days still need publishing is kept per destination: two deployments
/// publishing one database's days to two places each get the late events. A read noted
/// before reads were kept per destination stands for every destination.
#[tokio::test]
async fn late_days_are_kept_per_destination() {
    use sluice_jobs::export::{late_days, publish_late_days};
    let db = TestDb::initialized().await;
    let (a, b, c) = (temp_dir(), temp_dir(), temp_dir());
    let ctx = |dir: &std::path::Path| {
        ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(dir)))
    };
    let (ca, cb, cc) = (ctx(&a), ctx(&b), ctx(&c));
    let writer = EventWriter::new(
        db.store.clone(),
        WriterOptions {
            late_mark_ahead: Duration::ZERO,
            ..Default::default()
        },
    );
    let d = day(-3);
    writer.write(&[event(0, d), event(1, d)]).await.unwrap();
    let kind = ExportJobType::EventData;
    let due = |ctx: &ExportContext| {
        let ctx = ctx.clone();
        async move { late_days(&ctx, kind, 90).await.unwrap() }
    };
    assert_eq!(due(&ca).await, [d]);
    let done = publish_late_days(&ca, kind, |_| true, 90, None, false)
        .await
        .unwrap();
    assert_eq!(done.published.len(), 1, "{:?}", done.failed);
    assert!(due(&ca).await.is_empty());
    // Its run is recorded as one for late events, told apart from one asked for.
    let run = db
        .store
        .collection("export_jobs")
        .find_one(doc! { "jobId": &done.published[0].job_id })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(run.get_bool("lateEvents"), Ok(true), "{run}");
    // Published to A only: B still needs it.
    assert_eq!(due(&cb).await, [d]);
    let done = publish_late_days(&cb, kind, |_| true, 90, None, false)
        .await
        .unwrap();
    assert_eq!(done.published.len(), 1, "{:?}", done.failed);
    assert_eq!(manifest(&b, &format!("EVENT_DATA/dt={d}"))["rows"], 2);
    assert!(due(&cb).await.is_empty());
    // A read noted the old way (by kind alone), after the mark: read for C too.
    assert_eq!(due(&cc).await, [d]);
    let later = db.store.now().timestamp_millis() + 120_000;
    db.store
        .collection("late_days")
        .update_one(
            doc! { "_id": d.to_string() },
            doc! { "$set": { "exported.EVENT_DATA": DateTime::from_millis(later) } },
        )
        .await
        .unwrap();
    assert!(due(&cc).await.is_empty());
    for dir in [a, b, c] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// With `archive_after_days = 3`: a missed window ARCHIVE took first is skipped, not
/// refused for ever (later windows still run); a late event for the newest day ARCHIVE
/// does not take yet is published again (it used to be forgotten a day early); one for an
/// archived day is left to the next ARCHIVE.
#[tokio::test]
async fn late_days_are_published_until_archived_and_archived_windows_do_not_stop_catch_up() {
    use sluice_jobs::export::catch_up;
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let writer = EventWriter::new(
        db.store.clone(),
        WriterOptions {
            late_mark_ahead: Duration::ZERO,
            ..Default::default()
        },
    );
    let (archived, newest_kept, kept) = (day(-4), day(-3), day(-2));
    for d in [archived, newest_kept, kept] {
        let events: Vec<Event> = (0..10).map(|i| event(i, d)).collect();
        writer.write(&events).await.unwrap();
    }
    // The schedule last completed five days ago; ARCHIVE ran meanwhile.
    event_data_completed_through(&db, day(-5)).await;
    let archive = ExportRequest {
        archive_after_days: 3,
        ..request(ExportJobType::Archive, day(0), day(0))
    };
    let a = run_export(&ctx, &archive).await.unwrap();
    assert_eq!(a.partitions.len(), 1, "{a:?}");
    assert_eq!(a.partitions[0].prefix, format!("ARCHIVE/dt={archived}"));

    let archived_first = event_data_not_exported("archived_first");
    let done = catch_up(&ctx, ExportJobType::EventData, day(-1), 10, 3)
        .await
        .unwrap();
    // Counted (other tests may count too: at least this one).
    assert!(event_data_not_exported("archived_first") > archived_first);
    let windows: Vec<&str> = done
        .iter()
        .map(|s| s.partitions[0].prefix.as_str())
        .collect();
    assert_eq!(
        windows,
        [
            format!("EVENT_DATA/dt={newest_kept}"),
            format!("EVENT_DATA/dt={kept}"),
            format!("EVENT_DATA/dt={}", day(-1)),
        ],
        "the archived window skipped, the rest in order"
    );

    // Late events: one for the day ARCHIVE takes next, one for the archived day.
    let mut late = event(10, newest_kept);
    late.event_id = "late-kept".into();
    let mut late_archived = event(11, archived);
    late_archived.event_id = "late-archived".into();
    writer.write(&[late, late_archived]).await.unwrap();
    let again = catch_up(&ctx, ExportJobType::EventData, day(-1), 10, 3)
        .await
        .unwrap();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(
        manifest(&dir, &format!("EVENT_DATA/dt={newest_kept}"))["rows"],
        11
    );
    // The archived day's mark is forgotten (its late event waits for the next ARCHIVE).
    let marks: Vec<String> = db
        .store
        .collection("late_days")
        .find(doc! {})
        .await
        .unwrap()
        .try_collect::<Vec<Document>>()
        .await
        .unwrap()
        .iter()
        .map(|m| m.get_str("_id").unwrap().to_string())
        .collect();
    assert!(!marks.contains(&archived.to_string()), "{marks:?}");
    let next = run_export(&ctx, &archive).await.unwrap();
    assert_eq!(next.deleted, 1, "the late event, archived");
    // Added to its day's partition, counts and all: every row read is there.
    let m = manifest(&dir, &next.partitions[0].prefix);
    assert_eq!(m["rowsRead"], m["rows"], "{m}");
    assert!(m["files"].as_array().unwrap().len() >= 2, "{m}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A rerun that reads nothing where a day was published (its events gone, or another
/// database read by mistake) keeps the partition: EVENT_DATA by its rows, DAILY_ANALYTICS
/// (whose day always has a row, of zeros when empty) by the events its row counts.
#[tokio::test]
async fn an_empty_rerun_keeps_what_was_published_daily_analytics_too() {
    let db = TestDb::initialized().await;
    let empty = TestDb::initialized().await;
    let dir = temp_dir();
    let (d, quiet) = (day(-2), day(-3));
    seed(&db, d, 30).await;
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    for kind in [ExportJobType::EventData, ExportJobType::DailyAnalytics] {
        run_export(&ctx, &request(kind, quiet, d)).await.unwrap();
    }
    let daily = format!("DAILY_ANALYTICS/dt={d}");
    let published = manifest(&dir, &daily);
    // The day's events, bots left out as the row counts them.
    let counted = published["sourceRows"].as_u64().unwrap_or(0);
    assert!((1..=30).contains(&counted), "{published}");
    assert_eq!(
        manifest(&dir, &format!("DAILY_ANALYTICS/dt={quiet}"))["sourceRows"],
        0
    );
    // The same window from a database with no events.
    let wrong = ExportContext::new(empty.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    for (kind, prefix) in [
        (ExportJobType::EventData, format!("EVENT_DATA/dt={d}")),
        (ExportJobType::DailyAnalytics, daily.clone()),
    ] {
        let before = manifest(&dir, &prefix);
        let rerun = run_export(&wrong, &request(kind, quiet, d)).await.unwrap();
        let p = rerun
            .partitions
            .iter()
            .find(|p| p.prefix == prefix)
            .unwrap();
        assert!(p.kept, "{kind:?}: {rerun:?}");
        assert_eq!(manifest(&dir, &prefix), before, "{kind:?}");
    }
    // A day that had no events is published again: nothing is lost by it.
    let quiet_daily = format!("DAILY_ANALYTICS/dt={quiet}");
    let before = manifest(&dir, &quiet_daily);
    let rerun = run_export(
        &wrong,
        &request(ExportJobType::DailyAnalytics, quiet, quiet),
    )
    .await
    .unwrap();
    assert!(!rerun.partitions[0].kept, "{rerun:?}");
    assert_ne!(manifest(&dir, &quiet_daily)["jobId"], before["jobId"]);
    // A manifest from before `sourceRows` was kept counts as holding events.
    let path = dir.join(&daily).join("_manifest.json");
    let mut older = manifest(&dir, &daily);
    older.as_object_mut().unwrap().remove("sourceRows");
    std::fs::write(&path, serde_json::to_vec(&older).unwrap()).unwrap();
    let rerun = run_export(&wrong, &request(ExportJobType::DailyAnalytics, d, d))
        .await
        .unwrap();
    assert!(rerun.partitions[0].kept, "{rerun:?}");
    // Its record says the partition was left alone, not replaced by no files.
    let job = job_doc(&empty, &rerun.job_id).await;
    let listed = job.get_array("partitions").unwrap()[0]
        .as_document()
        .unwrap();
    assert_eq!(listed.get_str("mode"), Ok("kept"), "{job}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A run that began reading before the partition's published snapshot was read (a slow
/// backfill overtaken by the schedule republishing a late day) keeps that newer snapshot
/// rather than putting an older one over it.
#[tokio::test]
async fn an_older_snapshot_does_not_replace_a_newer_published_one() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let d = day(-2);
    seed(&db, d, 30).await;
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let first = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    let prefix = format!("EVENT_DATA/dt={d}");
    let published = manifest(&dir, &prefix);
    assert!(published["readAt"].is_string(), "{published}");
    // A rerun reads later: it replaces the partition.
    let second = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    assert_eq!(manifest(&dir, &prefix)["jobId"], second.job_id.as_str());
    assert_ne!(first.job_id, second.job_id);
    // The published snapshot now says it was read after this run will begin reading.
    let path = dir.join(&prefix).join("_manifest.json");
    let mut newer = manifest(&dir, &prefix);
    newer["readAt"] = serde_json::json!("2999-01-01T00:00:00.000Z");
    std::fs::write(&path, serde_json::to_vec(&newer).unwrap()).unwrap();
    let third = run_export(&ctx, &request(ExportJobType::EventData, d, d))
        .await
        .unwrap();
    assert!(third.partitions[0].kept, "{third:?}");
    assert_eq!(manifest(&dir, &prefix), newer, "the newer snapshot is kept");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn a_dead_run_s_leftover_work_files_are_swept_a_day_later() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let work = temp_dir();
    let old = work.join("sluice-work-dead-2026-01-01.ids");
    std::fs::write(&old, "\"e1\"\n").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&old)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86_400))
        .unwrap();
    let fresh = work.join("sluice-work-live-2026-01-02");
    std::fs::create_dir_all(&fresh).unwrap();
    let other = work.join("not-ours.txt");
    std::fs::write(&other, "keep").unwrap();
    let mut ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    ctx.work_dir = work.clone();
    run_export(&ctx, &request(ExportJobType::EventData, day(-3), day(-3)))
        .await
        .unwrap();
    assert!(!old.exists(), "a day-old leftover is removed");
    assert!(
        fresh.exists(),
        "a recent one may belong to a run going on elsewhere"
    );
    assert!(other.exists(), "only Sluice's own work files are touched");
    std::fs::remove_dir_all(dir).unwrap();
    std::fs::remove_dir_all(work).unwrap();
}

/// A manual archive to another destination (`export run archive --dest`) waits for the
/// scheduled exports' reads of late days where they publish: at its own destination
/// there are none, and it would hold every late day for `LATE_WAIT`.
#[tokio::test]
async fn an_archive_elsewhere_waits_for_the_reads_where_the_schedules_publish() {
    let db = TestDb::initialized().await;
    let (home, elsewhere) = (temp_dir(), temp_dir());
    let old = day(-100);
    seed(&db, old, 6).await;
    let scheduled = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&home)));
    let manual = ExportContext::new(
        db.store.clone(),
        ObjectStore::Local(LocalDir::new(&elsewhere)),
    );
    let archive = ExportRequest {
        late_readers: vec![ExportJobType::EventData],
        late_readers_at: Some(scheduled.dest.url("")),
        ..request(ExportJobType::Archive, day(0), day(0))
    };
    let waited = run_export(&manual, &archive).await.unwrap();
    assert_eq!(
        waited.deleted, 0,
        "the schedule has not read the late day yet"
    );
    assert_eq!(waited.deferred.len(), 1, "{:?}", waited.deferred);
    // The scheduled EVENT_DATA publishes the day again where it publishes.
    let after = DateTime::from_millis(db.store.now().timestamp_millis() + 120_000);
    sluice_jobs::export::late_day_exported(&scheduled, ExportJobType::EventData, old, after).await;
    let taken = run_export(&manual, &archive).await.unwrap();
    assert_eq!(taken.deleted, 6, "{:?}", taken.deferred);
    assert!(
        std::fs::read_dir(&elsewhere).unwrap().next().is_some(),
        "the day is archived to the run's own destination"
    );
    std::fs::remove_dir_all(home).ok();
    std::fs::remove_dir_all(elsewhere).unwrap();
}

/// Events another tool wrote to `events` have no claim in the ledger: archiving them makes
/// one, so the same events sent again (an import of the same data) are duplicates, not
/// stored anew and archived twice.
#[tokio::test]
async fn an_archive_claims_the_events_another_tool_wrote_so_a_resend_is_a_duplicate() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let old = day(-100);
    let written: Vec<Event> = (0..4).map(|i| event(i, old)).collect();
    let docs: Vec<Document> = written
        .iter()
        .map(|e| {
            let mut d = bson::to_document(e).unwrap();
            // Stored some time ago, as a bulk load would have.
            let stored = DateTime::from_millis(e.timestamp.timestamp_millis() + 60_000);
            d.insert("createdAt", stored);
            d.insert("updatedAt", stored);
            d
        })
        .collect();
    db.store
        .collection("events")
        .insert_many(docs)
        .await
        .unwrap();
    let ledger = db.store.collection("event_ids");
    assert_eq!(ledger.count_documents(doc! {}).await.unwrap(), 0);
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let archive = request(ExportJobType::Archive, day(0), day(0));
    let first = run_export(&ctx, &archive).await.unwrap();
    assert_eq!(first.deleted, 4, "{:?}", first.deferred);
    let claim = ledger
        .find_one(doc! { "_id": &written[0].event_id })
        .await
        .unwrap()
        .expect("a claim made for the archived event");
    assert_eq!(claim.get_bool("archived"), Ok(true), "{claim}");
    assert_eq!(
        claim.get_datetime("ts").unwrap().timestamp_millis(),
        ms(old, 0),
        "the day's start: {claim}"
    );
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    assert_eq!(
        writer.write(&written).await.unwrap(),
        vec![WriteStatus::Duplicate; 4]
    );
    assert_eq!(
        db.store
            .collection("events")
            .count_documents(doc! {})
            .await
            .unwrap(),
        0
    );
    std::fs::remove_dir_all(dir).unwrap();
}

/// With no schedule to name the exports that read late days (an orchestrator runs `export
/// run`), ARCHIVE waits for the by-day kinds that published the day where it archives.
#[tokio::test]
async fn an_archive_waits_for_the_exports_that_published_the_day_without_a_schedule() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let (old, never) = (day(-100), day(-101));
    seed(&db, old, 5).await;
    seed(&db, never, 3).await;
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    // Published once, by a run nobody scheduled, which notes when it read the day (the
    // mark, a minute ahead of the events just stored, is newer).
    let before = db.store.now().timestamp_millis();
    run_export(&ctx, &request(ExportJobType::EventData, old, old))
        .await
        .unwrap();
    let mark = db
        .store
        .collection("late_days")
        .find_one(doc! { "_id": old.to_string() })
        .await
        .unwrap()
        .unwrap();
    let exported = mark.get_document("exported").unwrap();
    let (key, read) = exported.iter().next().unwrap();
    assert!(key.starts_with("EVENT_DATA@"), "{mark}");
    assert!(
        read.as_datetime().unwrap().timestamp_millis() >= before,
        "{mark}"
    );
    let archive = request(ExportJobType::Archive, day(0), day(0));
    assert!(archive.late_readers.is_empty());
    let waited = run_export(&ctx, &archive).await.unwrap();
    // The day no export published is archived; the one EVENT_DATA published waits.
    assert_eq!(waited.deleted, 3, "{:?}", waited.deferred);
    assert_eq!(waited.deferred.len(), 1, "{:?}", waited.deferred);
    assert!(
        waited.deferred[0].starts_with(&format!("{old}: its late events"))
            && waited.deferred[0].contains("EVENT_DATA"),
        "{:?}",
        waited.deferred
    );
    // A kind that has not run there for longer than ARCHIVE waits (a one-off backfill
    // long ago) is not waited for.
    let long_ago = DateTime::from_millis(db.store.now().timestamp_millis() - 4 * 86_400_000);
    db.store
        .collection("export_jobs")
        .update_many(
            doc! { "type": "EVENT_DATA" },
            doc! { "$set": { "startTime": long_ago, "endTime": long_ago } },
        )
        .await
        .unwrap();
    let taken = run_export(&ctx, &archive).await.unwrap();
    assert_eq!(taken.deleted, 5, "{:?}", taken.deferred);
    std::fs::remove_dir_all(dir).unwrap();
}

/// A day with late events the scheduled EVENT_DATA export has not published again waits
/// for it before ARCHIVE takes it (archived first, they would never reach EVENT_DATA); a
/// mark nobody reads for longer than `LATE_WAIT` does not hold the day for ever.
#[tokio::test]
async fn an_archive_waits_for_late_events_to_be_published_again() {
    let db = TestDb::initialized().await;
    let dir = temp_dir();
    let old = day(-100);
    seed(&db, old, 20).await;
    // The writer marked the day as it stored its (late) events.
    let late = db.store.collection("late_days");
    let now = db.store.now().timestamp_millis();
    let mark = late
        .find_one(doc! { "_id": old.to_string() })
        .await
        .unwrap()
        .expect("marked");
    assert!(mark.get_datetime("markedAt").unwrap().timestamp_millis() >= now - 60_000);
    let ctx = ExportContext::new(db.store.clone(), ObjectStore::Local(LocalDir::new(&dir)));
    let archive = ExportRequest {
        late_readers: vec![ExportJobType::EventData],
        ..request(ExportJobType::Archive, day(0), day(0))
    };
    let events = db.store.collection("events");
    let waited = run_export(&ctx, &archive).await.unwrap();
    assert_eq!(waited.deleted, 0);
    assert_eq!(events.count_documents(doc! {}).await.unwrap(), 20);
    // The run says which day waits and for what, and so does its record.
    assert_eq!(waited.deferred.len(), 1, "{:?}", waited.deferred);
    assert!(
        waited.deferred[0].starts_with(&format!("{old}: its late events"))
            && waited.deferred[0].contains("EVENT_DATA"),
        "{:?}",
        waited.deferred
    );
    let job = job_doc(&db, &waited.job_id).await;
    assert_eq!(
        job.get_array("deferred").unwrap(),
        &vec![bson::Bson::String(waited.deferred[0].clone())]
    );
    // EVENT_DATA has published the day again since the mark: the archive takes it.
    late.update_one(
        doc! { "_id": old.to_string() },
        doc! { "$set": { "exported.EVENT_DATA": DateTime::from_millis(now + 120_000) } },
    )
    .await
    .unwrap();
    let taken = run_export(&ctx, &archive).await.unwrap();
    assert_eq!(taken.deleted, 20);
    // Late events for the day ARCHIVE took: EVENT_DATA refuses an archived day, so they
    // are not waited for (they would wait for nothing) but added to its partition.
    let writer = EventWriter::new(db.store.clone(), WriterOptions::default());
    let more: Vec<Event> = (100..104).map(|i| event(i, old)).collect();
    writer.write(&more).await.unwrap();
    late.update_one(
        doc! { "_id": old.to_string() },
        doc! { "$set": { "markedAt": DateTime::from_millis(now + 240_000) } },
    )
    .await
    .unwrap();
    let added = run_export(&ctx, &archive).await.unwrap();
    assert!(added.deferred.is_empty(), "{:?}", added.deferred);
    assert_eq!(added.deleted, 4);
    // A mark no reader has taken within LATE_WAIT holds nothing.
    seed(&db, day(-101), 5).await;
    let stale = now - sluice_jobs::export::LATE_WAIT.as_millis() as i64 - 60_000;
    late.update_one(
        doc! { "_id": day(-101).to_string() },
        doc! { "$set": { "markedAt": DateTime::from_millis(stale) } },
    )
    .await
    .unwrap();
    let archived_unpublished = || event_data_not_exported("late_events_archived_first");
    let before = archived_unpublished();
    let anyway = run_export(&ctx, &archive).await.unwrap();
    assert_eq!(anyway.deleted, 5);
    // Counted against the export that never published them (other tests may count too).
    assert!(archived_unpublished() > before);
    // Without scheduled readers of late days, nothing is waited for.
    seed(&db, day(-102), 3).await;
    let unwaited = run_export(&ctx, &request(ExportJobType::Archive, day(0), day(0)))
        .await
        .unwrap();
    assert_eq!(unwaited.deleted, 3);
    std::fs::remove_dir_all(dir).unwrap();
}
