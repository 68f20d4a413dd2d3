//! The main job on embedded defaults (`sluice demo`): starts the tracking server
//! in-process, sends a realistic stream of events over HTTP (several visitors and
//! sessions, page views, purchases, a crawler, a resent batch), imports contacts from a
//! local CRM API behind OAuth2 through the `redact-pii` WASM plugin, runs the exports, and
//! reports what MongoDB and the output folder now hold. [`Traffic`] is also the load
//! generator of the benchmarks and tests.

pub mod crm;

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use bson::{doc, Document};
use futures_util::TryStreamExt;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sluice_core::config::Config;
use sluice_core::model::{collections as c, ExportJobType};

pub const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
    "Mozilla/5.0 (X11; Linux x86_64; rv:127.0) Gecko/20100101 Firefox/127.0",
];
pub const BOT_AGENT: &str =
    "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
const PAGES: &[&str] = &[
    "/",
    "/products",
    "/products/espresso-machine",
    "/products/grinder",
    "/products/beans",
    "/blog/brewing-guide",
    "/cart",
    "/checkout",
];

/// A generator of realistic tracking traffic: visitors with sessions of page views,
/// clicks, cart events and purchases, spread over the last `span_ms` milliseconds.
pub struct Traffic {
    rng: StdRng,
    pub run_id: String,
    next_visitor: usize,
}

impl Traffic {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            run_id: format!("{seed:x}"),
            next_visitor: 0,
        }
    }

    /// Events of `visitors` new visitors (never seen in earlier calls), 1-3 sessions each, 2-12 events a session, as
    /// tracking-API JSON (with `context.userAgent`), in time order per session.
    pub fn visitors(&mut self, visitors: usize, now_ms: i64, span_ms: i64) -> Vec<Value> {
        let mut out = Vec::new();
        for _ in 0..visitors {
            let visitor = format!("visitor-{}-{}", self.run_id, self.next_visitor);
            self.next_visitor += 1;
            let ua = USER_AGENTS[self.rng.random_range(0..USER_AGENTS.len())];
            let sessions = self.rng.random_range(1..=3);
            for s in 0..sessions {
                let session = format!("{visitor}-s{s}");
                let mut t = now_ms - self.rng.random_range(0..span_ms.max(1));
                let n = self.rng.random_range(2..=12);
                for i in 0..n {
                    t += self.rng.random_range(1_000..90_000);
                    out.push(self.event(&visitor, &session, ua, t.min(now_ms), i, n));
                }
            }
        }
        out
    }

    fn event(
        &mut self,
        visitor: &str,
        session: &str,
        ua: &str,
        t: i64,
        i: usize,
        n: usize,
    ) -> Value {
        let page = PAGES[self.rng.random_range(0..PAGES.len())];
        let roll = self.rng.random_range(0..100);
        let (event_type, properties) = if i == n - 1 && roll < 30 {
            let amount = f64::from(self.rng.random_range(500..25_000)) / 100.0;
            (
                "PURCHASE",
                json!({ "amount": amount, "currency": "EUR", "productId": format!("p-{}", roll % 7) }),
            )
        } else if roll < 60 || i == 0 {
            (
                "PAGE_VIEW",
                json!({ "title": page.trim_start_matches('/') }),
            )
        } else if roll < 80 {
            ("CLICK", json!({ "element": "button.buy" }))
        } else {
            (
                "ADD_TO_CART",
                json!({ "productId": format!("p-{}", roll % 7) }),
            )
        };
        json!({
            "eventId": uuid::Uuid::from_u128(self.rng.random()).to_string(),
            "userId": visitor,
            "sessionId": session,
            "eventType": event_type,
            "timestamp": t,
            "pageUrl": if event_type == "PURCHASE" { "/checkout" } else { page },
            "referrer": if i == 0 { "https://search.example/" } else { "" },
            "duration": self.rng.random_range(200..60_000),
            "properties": properties,
            "context": { "userAgent": ua },
        })
    }

    /// Shuffles in place (deliveries arrive out of order).
    pub fn shuffle(&mut self, events: &mut [Value]) {
        events.shuffle(&mut self.rng);
    }
}

/// Runs the main job and prints the report.
pub async fn run(mut config: Config, visitors: usize) -> anyhow::Result<()> {
    let started = Instant::now();
    println!("sluice demo: database `{}`", config.database);
    let store = crate::cli::db_init(&config).await?;
    let export_config = config.clone();
    let config_destination = config.destination.to_string();
    config.listen = "127.0.0.1:0".parse()?;
    // The stream is a server-side replay (each event names its own user agent): a
    // server-side key when there is one, so those are believed.
    let key = config
        .server_write_keys
        .first()
        .or(config.write_keys.first())
        .map(|k| k.expose().to_string());
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let server = crate::server::start(config, store.clone(), listener, false).await?;
    let base = format!("http://{}", server.addr);
    println!("tracking endpoint on {base}");

    let now = chrono::Utc::now().timestamp_millis();
    let seed = now as u64;
    let mut traffic = Traffic::new(seed);
    let mut events = traffic.visitors(visitors, now, 6 * 3_600_000);
    // A crawler visiting a few pages: stored with `metadata.bot = true` (policy `keep`).
    for (i, page) in ["/", "/products", "/blog/brewing-guide"].iter().enumerate() {
        events.push(json!({
            "eventId": format!("crawler-{seed:x}-{i}"),
            "userId": format!("crawler-{seed:x}"), "sessionId": format!("crawler-{seed:x}-s0"),
            "eventType": "PAGE_VIEW", "pageUrl": page, "timestamp": now - 60_000 + i as i64 * 1000,
            "context": { "userAgent": BOT_AGENT },
        }));
    }
    traffic.shuffle(&mut events);
    let client = reqwest::Client::new();
    let mut totals = [0u64; 4]; // stored, duplicates, dropped, rejected
    let batches: Vec<&[Value]> = events.chunks(100).collect();
    // The first batch is sent twice: a client retry after a lost answer.
    let resend = batches.first().copied();
    for batch in batches.iter().copied().chain(resend) {
        let mut req = client
            .post(format!("{base}/v1/events/batch"))
            .json(&json!({ "batch": batch, "sentAt": chrono::Utc::now().timestamp_millis() }));
        if let Some(k) = &key {
            req = req.header("x-write-key", k);
        }
        let resp = req.send().await.context("posting a batch")?;
        let status = resp.status();
        let body: Value = resp.json().await.context("reading the answer")?;
        anyhow::ensure!(
            status.is_success(),
            "tracking endpoint answered {status}: {body}"
        );
        for (slot, field) in ["stored", "duplicates", "dropped", "rejected"]
            .iter()
            .enumerate()
        {
            totals[slot] += body[field].as_u64().unwrap_or(0);
        }
    }
    server.shutdown().await;
    println!(
        "sent {} events in {} requests (the first batch twice): {} stored, {} duplicates ignored, {} dropped, {} rejected",
        events.len() + resend.map_or(0, <[Value]>::len),
        batches.len() + 1,
        totals[0],
        totals[1],
        totals[2],
        totals[3]
    );
    let mut visitors: Vec<String> = events
        .iter()
        .filter_map(|e| e["userId"].as_str())
        .filter(|v| !v.starts_with("crawler-"))
        .map(str::to_string)
        .collect();
    visitors.sort();
    visitors.dedup();
    import_contacts(&export_config, &store, &visitors).await?;
    report(&store, now - 7 * 3_600_000).await?;

    println!("\nExports to {}:", config_destination);
    let today = chrono::Utc::now().date_naive();
    for kind in [
        ExportJobType::EventData,
        ExportJobType::DailyAnalytics,
        ExportJobType::UserData,
    ] {
        let from = today - chrono::Days::new(1);
        let summary =
            crate::cli::export_run(&export_config, kind, Some(from), Some(today), None, false)
                .await
                .with_context(|| format!("{kind} export"))?;
        if let Some(first) = summary.partitions.iter().flat_map(|p| &p.files).next() {
            println!("    e.g. {}", first);
        }
    }
    println!(
        "\nRead the Parquet files with any engine, for example DuckDB:\n  duckdb -c \"SELECT eventType, count(*) FROM '{}/EVENT_DATA/*/*.parquet' GROUP BY 1\"",
        config_destination
    );
    println!("Every run is recorded in the `export_jobs` collection.");
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The bundled demo import: `examples/demo/crm-contacts.toml` against the local CRM API.
async fn import_contacts(
    config: &Config,
    store: &sluice_connectors::Store,
    visitors: &[String],
) -> anyhow::Result<()> {
    use sluice_jobs::import::{run_import, ImportOptions};
    const FILE: &str = "examples/demo/crm-contacts.toml";
    let crm = crm::start(crm::contacts(visitors)).await?;
    let mut file = sluice_core::integration::parse_file(
        FILE,
        include_str!("../../examples/demo/crm-contacts.toml"),
    )?;
    file.endpoint = format!("http://{}/api/contacts", crm.addr);
    file.auth.token_url = Some(format!("http://{}/oauth/token", crm.addr));
    let mut config = config.clone();
    let plugin = "redact-pii";
    let built = Path::new(&config.plugins.dir)
        .join(format!("{plugin}.toml"))
        .exists();
    let transforms = if built {
        config
            .plugin_configs
            .0
            .entry(plugin.into())
            .or_insert_with(|| {
                toml::Value::Table(toml::map::Map::from_iter([(
                    "salt".to_string(),
                    toml::Value::String("sluice-demo-salt-change-me".into()),
                )]))
            });
        crate::cli::load_plugins(&config, &[plugin.to_string()])?
    } else {
        println!(
            "
(plugin `{plugin}` is not built in `{}`: importing without it; run scripts/build-plugins.sh)",
            config.plugins.dir
        );
        file.transforms.clear();
        Vec::new()
    };
    // The demo API lives only as long as the demo: stored inactive, so a later `sluice
    // serve` on this database does not fire the config's hourly schedule at a dead port.
    file.is_active = false;
    sluice_jobs::configs::apply(store, &file).await?;
    // The config refers to its secret as `${env:SLUICE_DEMO_CRM_SECRET}`; the demo API's
    // secret is fixed, so provide it (the environment is not touched).
    let options = ImportOptions {
        transforms,
        secrets: [(
            "SLUICE_DEMO_CRM_SECRET".to_string(),
            crm::CLIENT_SECRET.to_string(),
        )]
        .into(),
        ..Default::default()
    };
    let summary = run_import(store, &file.name, &options)
        .await
        .with_context(|| format!("import `{}`", file.name))?;
    println!(
        "
Import `{}` ({FILE}): {} contacts fetched in {} behind OAuth2 ({}), {} inserted, {} updated, {} failed mapping",
        summary.name,
        summary.fetched,
        sluice_core::counted(summary.pages, "page"),
        sluice_core::counted(summary.http.token_refreshes, "token request"),
        summary.inserted,
        summary.updated,
        summary.failed
    );
    if built {
        println!("  emails were replaced by salted SHA-256 digests by the `{plugin}` WASM plugin before storage");
    }
    Ok(())
}

async fn report(store: &sluice_connectors::Store, since_ms: i64) -> anyhow::Result<()> {
    let count = |name: &'static str, filter: Document| {
        let coll = store.collection(name);
        async move { coll.count_documents(filter).await }
    };
    println!("\nMongoDB now holds:");
    println!("  events    {:>7}", count(c::EVENTS, doc! {}).await?);
    println!("  sessions  {:>7}", count(c::SESSIONS, doc! {}).await?);
    println!("  users     {:>7}", count(c::USERS, doc! {}).await?);
    println!("  contacts  {:>7}", count("contacts", doc! {}).await?);
    println!(
        "  bot events flagged {}",
        count(c::EVENTS, doc! { "metadata.bot": true }).await?
    );
    let since = bson::DateTime::from_millis(since_ms);
    let top: Vec<Document> = store
        .collection(c::EVENTS)
        .aggregate(vec![
            doc! { "$match": { "eventType": "PAGE_VIEW", "timestamp": { "$gte": since } } },
            doc! { "$group": { "_id": "$pageUrl", "views": { "$sum": 1 }, "uniqueUsers": { "$addToSet": "$userId" } } },
            doc! { "$project": { "pageUrl": "$_id", "views": 1, "uniqueUsers": { "$size": "$uniqueUsers" } } },
            doc! { "$sort": { "views": -1, "pageUrl": 1 } },
            doc! { "$limit": 5 },
        ])
        .await?
        .try_collect()
        .await?;
    println!("\nTop pages (last 7 h):");
    for d in top {
        println!(
            "  {:<28} {:>5} views {:>5} visitors",
            d.get_str("pageUrl").unwrap_or("?"),
            d.get_i32("views")
                .map(i64::from)
                .or_else(|_| d.get_i64("views"))
                .unwrap_or(0),
            d.get_i32("uniqueUsers")
                .map(i64::from)
                .or_else(|_| d.get_i64("uniqueUsers"))
                .unwrap_or(0),
        );
    }
    let buyers: Vec<Document> = store
        .collection(c::USERS)
        .find(doc! { "totalPurchases": { "$gt": 0 } })
        .sort(doc! { "totalRevenue": -1 })
        .limit(3)
        .await?
        .try_collect()
        .await?;
    println!("\nTop buyers:");
    for u in buyers {
        println!(
            "  {:<28} {} purchases, revenue {:.2}",
            u.get_str("visitorId").unwrap_or("?"),
            u.get_i64("totalPurchases").unwrap_or(0),
            u.get_f64("totalRevenue").unwrap_or(0.0)
        );
    }
    println!(
        "\nLook at the data with any MongoDB client, for example:\n  mongosh '<your mongodb.uri>' --eval 'db.getSiblingDB(\"{}\").sessions.find().limit(3)'",
        store.db().name()
    );
    Ok(())
}
