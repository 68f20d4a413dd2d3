//! Integration configs as files in a folder (reviewed in git) and as documents in
//! `integration_configs` (what the engine runs). `validate_dir` checks a folder without
//! touching the database; `apply_dir` stores every valid file.

use std::path::{Path, PathBuf};

use bson::{doc, Document};
use sluice_connectors::{Store, StoreError};
use sluice_core::integration::{
    credential_in_query, parse_file, validate, Connector, IntegrationFile,
};
use sluice_core::model::{collections as c, common, integration_fields as f};
use sluice_core::ConfigError;

/// A file that parsed and validated.
pub struct ValidFile {
    pub path: PathBuf,
    pub file: IntegrationFile,
    pub connector: Connector,
}

/// Every `*.toml` in `dir`, validated; errors are collected, not stopped at.
pub fn validate_dir(
    dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(Vec<ValidFile>, Vec<ConfigError>), std::io::Error> {
    // One file named rather than its folder: that file alone.
    let mut paths: Vec<PathBuf> = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else {
        std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect()
    };
    paths.sort();
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    let mut names = std::collections::HashMap::new();
    for path in paths {
        let origin = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(reason) => {
                errors.push(ConfigError::Read { path, reason });
                continue;
            }
        };
        let validated = validate_text_all(&origin, &text, env);
        // A name used twice is said of any file that parses, valid or not, at its line.
        let name = match &validated {
            Ok((file, _)) => Some(file.name.clone()),
            Err(_) => sluice_core::integration::parse_file(&origin, &text)
                .ok()
                .map(|file| file.name),
        };
        let duplicate = name.and_then(|name| {
            let other = names.insert(name.clone(), origin.clone())?;
            Some(ConfigError::Invalid {
                origin: sluice_core::toml_errors::at_line(&origin, &text, "name"),
                field: "name".into(),
                expected: format!("a unique name (`{name}` is also used by {other})"),
            })
        });
        let mut all = match validated {
            Ok((file, connector)) if duplicate.is_none() => {
                ok.push(ValidFile {
                    path,
                    file,
                    connector,
                });
                continue;
            }
            Ok(_) => Vec::new(),
            Err(all) => all,
        };
        all.extend(duplicate);
        sluice_core::toml_errors::first_in_file(&mut all, ConfigError::line);
        errors.extend(all);
    }
    Ok((ok, errors))
}

/// The most errors said of one file.
pub use sluice_core::toml_errors::MAX_ERRORS_PER_FILE;

/// One config file's text, parsed and validated as `validate_dir` validates each file
/// (`origin` names it in errors): up to [`MAX_ERRORS_PER_FILE`] errors, each at its line,
/// in the file's order.
pub fn validate_text_all(
    origin: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(IntegrationFile, Connector), Vec<ConfigError>> {
    checked(origin, text, env).map_err(|first| {
        sluice_core::toml_errors::all_errors::<IntegrationFile>(
            origin,
            text,
            first,
            &|rest| checked(origin, rest, env).map(|_| ()),
            &sluice_core::integration::FILE_RULES,
        )
    })
}

fn checked(
    origin: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(IntegrationFile, Connector), ConfigError> {
    let file = parse_file(origin, text)?;
    refuse_literal_secrets(origin, &file)?;
    let connector = validate(origin, &file, env)?;
    sluice_core::integration::unused_paging_fields(&file.source.pagination).map_err(
        |(field, expected)| ConfigError::Invalid {
            origin: origin.to_string(),
            field,
            expected,
        },
    )?;
    if let Some(cron) = &file.schedule {
        // The same parser the scheduler uses: field values and names, not only counts.
        sluice_core::cron::parse(cron).map_err(|e| ConfigError::Invalid {
            origin: origin.to_string(),
            field: "schedule".into(),
            expected: e,
        })?;
    }
    Ok((file, connector))
}

/// Secrets are stored in MongoDB only as `${env:NAME}` references.
fn refuse_literal_secrets(origin: &str, file: &IntegrationFile) -> Result<(), ConfigError> {
    let a = &file.auth;
    for (field, url) in [
        ("endpoint", Some(&file.endpoint)),
        ("auth.token_url", a.token_url.as_ref()),
    ] {
        if let Some(name) = url.and_then(|u| credential_in_query(u)) {
            return Err(ConfigError::Invalid {
                origin: origin.to_string(),
                field: field.to_string(),
                expected: format!(
                    "a URL without a credential in its query (`{name}=`: it would be stored in clear and shown to every user); send an API key with `[auth] type = \"API_KEY\"`, `query = \"{name}\"`, `key = \"${{env:NAME}}\"`"
                ),
            });
        }
    }
    for (field, secret) in [
        ("auth.key", &a.key),
        ("auth.password", &a.password),
        ("auth.client_secret", &a.client_secret),
        ("auth.refresh_token", &a.refresh_token),
    ] {
        if let Some(s) = secret {
            if s.env_reference().is_none() {
                return Err(ConfigError::Invalid {
                    origin: origin.to_string(),
                    field: field.to_string(),
                    expected: "a `${env:NAME}` reference (secrets are never stored in clear)"
                        .into(),
                });
            }
        }
    }
    Ok(())
}

/// What [`apply`] did with a config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Created,
    Updated,
    /// Stored already exactly so: nothing written, `updatedAt` not moved.
    Unchanged,
}

impl Applied {
    pub fn as_str(self) -> &'static str {
        match self {
            Applied::Created => "created",
            Applied::Updated => "updated",
            Applied::Unchanged => "unchanged",
        }
    }
}

/// What to tell of applying `file` over the stored config of its name when that keeps an
/// incremental cursor whose reading the file changes (the cursor field, or its mapping's
/// `type`, `unit` or `format`): the stored cursor is sent back as it was, read the old
/// way (milliseconds sent where seconds are now meant), so the next run may skip or
/// repeat records. `None` when nothing such changes.
pub async fn cursor_reading_changed(
    store: &Store,
    file: &IntegrationFile,
) -> Result<Option<String>, StoreError> {
    let Some(stored) = store
        .collection(c::INTEGRATION_CONFIGS)
        .find_one(doc! { f::NAME: &file.name })
        .await
        .map_err(StoreError::mongo(c::INTEGRATION_CONFIGS, "read config"))?
    else {
        return Ok(None);
    };
    let Some(cursor) = stored
        .get(f::SYNC_CURSOR)
        .filter(|v| !matches!(v, bson::Bson::Null))
    else {
        return Ok(None);
    };
    let new = bson::to_document(file).map_err(|e| StoreError::Encode {
        collection: c::INTEGRATION_CONFIGS.into(),
        message: e.to_string(),
    })?;
    let old = stored.get_document(f::SPEC).cloned().unwrap_or_default();
    // The cursor field and how its mapping reads it.
    let reading = |spec: &Document| {
        let field = spec
            .get_document("incremental")
            .ok()
            .and_then(|i| i.get_str("cursor_field").ok())
            .map(str::to_string)?;
        let mapping = spec
            .get_document("mapping")
            .ok()
            .and_then(|m| m.get_document(&field).ok())
            .cloned()
            .unwrap_or_default();
        let how: Vec<String> = ["type", "unit", "format"]
            .iter()
            .map(|k| mapping.get(*k).map(ToString::to_string).unwrap_or_default())
            .collect();
        Some((field, how))
    };
    let (Some(before), Some(after)) = (reading(&old), reading(&new)) else {
        return Ok(None);
    };
    if before == after {
        return Ok(None);
    }
    Ok(Some(format!(
        "{}: the incremental cursor is now read another way (field `{}`, type/unit/format {} -> field `{}`, {}), but the stored cursor `{}` is kept and sent back as it is; if it should be read anew, run `sluice import reset {} --cursor` (the next run then reads everything)",
        file.name,
        before.0,
        before.1.join("/"),
        after.0,
        after.1.join("/"),
        crate::import::cursor_text(cursor),
        file.name
    )))
}

/// Stores (inserts or replaces) one config. `lastSync` and the cursor are kept.
pub async fn apply(store: &Store, file: &IntegrationFile) -> Result<Applied, StoreError> {
    // The database's clock, as the scheduler reads `scheduleSince` against its fires: a
    // host whose clock runs ahead would otherwise hold off the job's first fires.
    let now = store.now();
    let spec = bson::to_document(file).map_err(|e| StoreError::Encode {
        collection: c::INTEGRATION_CONFIGS.into(),
        message: e.to_string(),
    })?;
    let auth_config = spec.get_document("auth").cloned().unwrap_or_default();
    let mapping = spec.get_document("mapping").cloned().unwrap_or_default();
    let headers: Document = file
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), bson::Bson::String(v.clone())))
        .collect();
    // Whether the schedule takes effect anew (see `SCHEDULE_SINCE`): a re-apply of an
    // unchanged config (a deploy re-applying every file) does not move it.
    let before = store
        .collection(c::INTEGRATION_CONFIGS)
        .find_one(doc! { f::NAME: &file.name })
        .await
        .map_err(StoreError::mongo(c::INTEGRATION_CONFIGS, "apply config"))?;
    let schedule_changed = before.as_ref().is_none_or(|d| {
        d.get_str("schedule").ok() != file.schedule.as_deref()
            || timezone(d) != file.timezone
            || d.get_bool(f::IS_ACTIVE).ok() != Some(file.is_active)
            || !d.contains_key(f::SCHEDULE_SINCE)
    });
    let mut set = doc! {
        f::TYPE: file.kind.to_ascii_uppercase(),
        "endpoint": &file.endpoint,
        // The method used: an EXPORT without one pushes with POST.
        "method": file.method.as_deref().map_or_else(
            || if file.kind.eq_ignore_ascii_case("EXPORT") { "POST".into() } else { "GET".into() },
            str::to_ascii_uppercase,
        ),
        "headers": headers,
        "authType": file.auth.kind.to_ascii_uppercase(),
        "authConfig": auth_config,
        "mapping": mapping,
        "schedule": file.schedule.clone(),
        f::IS_ACTIVE: file.is_active,
        f::SPEC: spec,
        common::UPDATED_AT: now,
    };
    if schedule_changed {
        set.insert(f::SCHEDULE_SINCE, now);
    } else if before.as_ref().is_some_and(|d| {
        set.iter()
            .all(|(k, v)| k == common::UPDATED_AT || d.get(k) == Some(v))
    }) {
        return Ok(Applied::Unchanged);
    }
    let result = store
        .collection(c::INTEGRATION_CONFIGS)
        .update_one(
            doc! { f::NAME: &file.name },
            doc! { "$set": set, "$setOnInsert": { common::CREATED_AT: now } },
        )
        .upsert(true)
        .await
        .map_err(StoreError::mongo(c::INTEGRATION_CONFIGS, "apply config"))?;
    Ok(if result.upserted_id.is_some() {
        Applied::Created
    } else {
        Applied::Updated
    })
}

/// The IANA time zone a stored config's schedule is read in (`None`: UTC).
pub fn timezone(stored: &Document) -> Option<String> {
    stored
        .get_document(f::SPEC)
        .ok()
        .and_then(|s| s.get_str("timezone").ok())
        .map(str::to_string)
}

/// A stored config: its file form and its document (for `lastSync` and the cursor).
pub async fn load(
    store: &Store,
    name: &str,
) -> Result<Option<(IntegrationFile, Document)>, StoreError> {
    let Some(d) = store
        .collection(c::INTEGRATION_CONFIGS)
        .find_one(doc! { f::NAME: name })
        .await
        .map_err(StoreError::mongo(c::INTEGRATION_CONFIGS, "load config"))?
    else {
        return Ok(None);
    };
    let spec = d.get_document(f::SPEC).cloned().unwrap_or_default();
    let file: IntegrationFile = bson::from_document(spec).map_err(|e| StoreError::Encode {
        collection: c::INTEGRATION_CONFIGS.into(),
        message: format!("stored config `{name}` is not readable: {e}"),
    })?;
    Ok(Some((file, d)))
}

/// What [`remove`] deleted beside the config.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Removed {
    /// An interrupted run's checkpoint.
    pub checkpoint: bool,
    /// A rotated OAuth refresh token saved for it.
    pub saved_token: bool,
}

/// Deletes the stored config `name` (job `job`), with its checkpoint and saved refresh
/// token, so a config applied again under the name starts afresh. Its run history
/// (`import_runs`, `scheduled_runs`) and what it imported stay. Held as a run of the job,
/// so it waits for no run and none starts meanwhile: refused while one goes. `None` when
/// no such config is stored. The scheduler stops firing it at its next reload.
pub async fn remove(store: &Store, name: &str, job: &str) -> Result<Option<Removed>, StoreError> {
    // Looked up without reading it: a stored config that no longer parses (written by
    // hand, or by another version) must be removable too.
    let stored = store
        .collection(c::INTEGRATION_CONFIGS)
        .find_one(doc! { f::NAME: name })
        .projection(doc! { "_id": 1 })
        .await
        .map_err(StoreError::mongo(c::INTEGRATION_CONFIGS, "find config"))?;
    if stored.is_none() {
        return Ok(None);
    }
    let run = crate::schedule::start_manual_run(store, job, "configs delete").await?;
    let result = async {
        let deleted = |coll: &'static str, filter: Document| async move {
            store
                .collection(coll)
                .delete_one(filter)
                .await
                .map(|r| r.deleted_count == 1)
                .map_err(StoreError::mongo(coll, "delete config"))
        };
        let removed = Removed {
            checkpoint: deleted(c::IMPORT_CHECKPOINTS, doc! { common::ID: name }).await?,
            saved_token: deleted(c::OAUTH_TOKENS, doc! { common::ID: name }).await?,
        };
        // Last: until it is gone, a failed step above can be retried by running this again.
        deleted(c::INTEGRATION_CONFIGS, doc! { f::NAME: name }).await?;
        Ok::<_, StoreError>(removed)
    }
    .await;
    let line = match &result {
        Ok(_) => Ok("config deleted".to_string()),
        Err(e) => Err(e.to_string()),
    };
    crate::schedule::end_manual_run(store, &run, &line).await?;
    result.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "name = \"t\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example.com/items\"\n\n[target]\ncollection = \"things\"\nkey = \"sku\"\n\n[mapping.sku]\npath = \"$.id\"\n";

    fn all_errors(text: &str) -> Vec<String> {
        let Err(all) = validate_text_all("t.toml", text, &|_| None) else {
            panic!("valid: {text}");
        };
        all.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_collection_refused_leaves_the_rest_of_the_file_checked() {
        let text = "name = \"e\"\ntype = \"EXPORT\"\nendpoint = \"https://api.example.com/push\"\nheaders = { Authorization = \"Bearer abc\" }\n\n[push]\ncollection = \"event_ids\"\n";
        let all = all_errors(text);
        assert!(
            all.len() == 2
                && all[0].contains("headers.Authorization")
                && all[1].contains("push.collection"),
            "{all:#?}"
        );
        let import = BASE.replace("things", "event_ids").replace(
            "endpoint",
            "headers = { Authorization = \"Bearer abc\" }\nendpoint",
        );
        let all = all_errors(&import);
        assert!(
            all.len() == 2 && all.iter().any(|e| e.contains("headers.Authorization")),
            "{all:#?}"
        );
    }

    #[test]
    fn toml_errors_do_not_end_the_search() {
        assert!(validate_text_all("t.toml", BASE, &|_| None).is_ok());
        let text = format!(
            "{BASE}is_active = false\n\n[source]\ntimeout_seconds = \"x\"\n\n[source.pagination]\ntype = \"page\"\nsize = \"ten\"\nsizee = 3\n\n[mapping.price]\ntype = \"number\"\n\n[mapping.when]\npath = \"$.t\"\ntype = \"dat\"\n"
        );
        let line = |needle: &str| 1 + text.lines().position(|l| l.starts_with(needle)).unwrap();
        let all = all_errors(&text);
        for (at, said) in [
            // In `mapping.sku`, as it follows that table's header: the hint says so.
            (
                line("is_active"),
                "field `mapping.sku.is_active`: unknown field `is_active`",
            ),
            (
                line("timeout_seconds"),
                "field `source.timeout_seconds`: invalid type: string \"x\"",
            ),
            // In a table whose other field was set aside, and still said: an unknown
            // field is unknown whatever else the file holds.
            (
                line("sizee"),
                "field `source.pagination.sizee`: unknown field `sizee`",
            ),
            (
                line("size ="),
                "field `source.pagination.size`: invalid type: string \"ten\"",
            ),
            (line("type = \"dat\""), "field `mapping.when.type`"),
        ] {
            assert!(
                all.iter()
                    .any(|e| e.starts_with(&format!("t.toml:{at}: {said}"))),
                "{said}: {all:#?}"
            );
        }
        assert!(
            all.iter()
                .any(|e| e.contains("`is_active` is a top-level field")),
            "{all:#?}"
        );
        let price = line("[mapping.price]");
        assert!(
            all.iter()
                .any(|e| e
                    == &format!("t.toml:{price}: table `mapping.price`: missing field `path`")),
            "{all:#?}"
        );
        assert_eq!(all.len(), 6, "{all:#?}");
    }

    #[test]
    fn what_follows_from_a_setting_aside_is_not_said_and_fields_beside_it_are() {
        // A collection refused: the default collection's identity mapping is not asked
        // for (it follows from the default, not from the file).
        let own = "name = \"t\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example.com/u\"\n\n[target]\ncollection = \"admin_users\"\nkey = \"email\"\n\n[mapping.email]\npath = \"$.email\"\n";
        let all = all_errors(own);
        assert_eq!(all.len(), 1, "{all:#?}");
        assert!(all[0].contains("field `target.collection`"), "{all:#?}");
        // A key's mapping refused: the key is not said to have none.
        let key = "name = \"t\"\ntype = \"IMPORT\"\nendpoint = \"https://api.example.com/u\"\n\n[target]\ncollection = \"users\"\nkey = \"visitorId\"\n\n[mapping.visitorId]\npath = \"external_id\"\n";
        let all = all_errors(key);
        assert_eq!(all.len(), 1, "{all:#?}");
        assert!(
            all[0].contains("field `mapping.visitorId.path`"),
            "{all:#?}"
        );
        // Fields beside a wrong one, and in the tables below it, are checked on their own.
        let source = format!("{BASE}\n[source]\nrecords = \"$.items[*\"\ntimeout_seconds = 0\n\n[source.pagination]\ntype = \"pages\"\n\n[source.retry]\nmax_attempts = 50\n");
        let all = all_errors(&source);
        for field in [
            "source.records",
            "source.timeout_seconds",
            "source.pagination.type",
            "source.retry.max_attempts",
        ] {
            assert!(
                all.iter().any(|e| e.contains(&format!("field `{field}`"))),
                "{field}: {all:#?}"
            );
        }
        assert_eq!(all.len(), 4, "{all:#?}");
        // A check comparing a field with one set aside (now at its default) names it: not
        // said (`max_backoff_ms` of 100 is below the default 200, not the file's 5).
        let retry =
            format!("{BASE}\n[source.retry]\ninitial_backoff_ms = 5\nmax_backoff_ms = 100\n");
        let all = all_errors(&retry);
        assert_eq!(all.len(), 1, "{all:#?}");
        assert!(
            all[0].contains("field `source.retry.initial_backoff_ms`"),
            "{all:#?}"
        );
    }

    #[test]
    fn a_missing_field_set_aside_is_not_said() {
        // The path is refused by the check; once it is set aside the mapping has none,
        // which follows from setting it aside.
        let text = format!("{BASE}\n[mapping.a]\npath = \"$..[?(@.x\"\n\n[mapping.b]\npath = \"$.b\"\ntype = \"txt\"\n");
        let all = all_errors(&text);
        assert_eq!(all.len(), 2, "{all:#?}");
        assert!(all[0].contains("field `mapping.a.path`"), "{all:#?}");
        assert!(all[1].contains("field `mapping.b.type`"), "{all:#?}");
        // A required top-level field of the wrong type: a placeholder stands in for it, and
        // the rest is still checked.
        let text = BASE.replace("name = \"t\"", "name = 5")
            + "[mapping.c]\npath = \"$.c\"\ntype = \"txt\"\n";
        let all = all_errors(&text);
        assert_eq!(all.len(), 2, "{all:#?}");
        assert!(
            all[0].starts_with("t.toml:1: field `name`: invalid type: integer `5`"),
            "{all:#?}"
        );
        assert!(all[1].contains("field `mapping.c.type`"), "{all:#?}");
        // One with none to stand in ends the search: without it the file cannot be read.
        let text = BASE.replace("type = \"IMPORT\"", "type = 5")
            + "[mapping.c]\npath = \"$.c\"\ntype = \"txt\"\n";
        let all = all_errors(&text);
        assert_eq!(all.len(), 1, "{all:#?}");
        assert!(all[0].starts_with("t.toml:2: field `type`"), "{all:#?}");
        // A syntax error points at no field: TOML's own words, with the line quoted.
        let all = all_errors(&format!("{BASE}[mapping.d]\npath = \"$.d\n"));
        assert_eq!(all.len(), 1, "{all:#?}");
        let unclosed = BASE.lines().count() + 2;
        assert!(
            all[0].contains(&format!("TOML parse error at line {unclosed}")),
            "{all:#?}"
        );
    }
}
