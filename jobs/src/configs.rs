//! Integration configs as files in a folder (reviewed in git) and as documents in
//! `integration_configs` (what the engine runs). `validate_dir` checks a folder without
//! touching the database; `apply_dir` stores every valid file.

use std::path::{Path, PathBuf};

use bson::{doc, DateTime, Document};
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
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    let mut ok = Vec::new();
    let mut errors = Vec::new();
    let mut names = std::collections::HashMap::new();
    for path in paths {
        let origin = path.display().to_string();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(source) => {
                errors.push(ConfigError::Read { path, source });
                continue;
            }
        };
        let validated = validate_text(&origin, &text, env);
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
                origin: at_line(&origin, &text, "name"),
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
            Err(e) => {
                let mut all = later_errors(&origin, &text, &e, env);
                all.insert(0, e);
                all
            }
        };
        all.extend(duplicate);
        // In the file's order; those without a line (a field missing) last.
        all.sort_by_key(|e| e.line().unwrap_or(usize::MAX));
        errors.extend(all);
    }
    Ok((ok, errors))
}

/// `origin`, with the line of `text` that sets `field` (or its table's header), if found.
fn at_line(origin: &str, text: &str, field: &str) -> String {
    match sluice_core::integration::line_of(text, field) {
        Some(line) => format!("{origin}:{line}"),
        None => origin.to_string(),
    }
}

/// The most errors said of one file.
pub const MAX_ERRORS_PER_FILE: usize = 10;

/// A file's errors after its `first`, so that one run of `configs validate` shows most of
/// what is wrong: the invalid field is taken out of the file and the rest validated
/// again, until it validates, the error is not a field's (a syntax error, a required
/// field taken out), or [`MAX_ERRORS_PER_FILE`] are found. An error in a table a field
/// was taken from is taken out unsaid, as it may follow from taking the other (`auth.type`
/// gone, `auth.key` no longer fits): each error said is one the file has as written. A
/// required field taken out (a mapping's `path`) leaves its table unreadable: the table
/// is taken out instead, and errors in it, or naming it, are not said.
fn later_errors(
    origin: &str,
    text: &str,
    first: &ConfigError,
    env: &dyn Fn(&str) -> Option<String>,
) -> Vec<ConfigError> {
    let ConfigError::Invalid { field, .. } = first else {
        return Vec::new();
    };
    let Ok(mut table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    // What was set aside: a field (an error in its table may follow from it), or, when
    // setting a required field aside left its table unreadable, that table whole (an
    // error inside it, or naming it, may follow).
    let mut taken: Vec<(String, bool)> = vec![(field.clone(), false)];
    let mut found = Vec::new();
    if !take(&mut table, field) {
        return found;
    }
    // Each pass sets something aside, so a file has fewer passes than fields; the bound
    // is for files of thousands of invalid fields.
    let mut passes = 0;
    while found.len() + 1 < MAX_ERRORS_PER_FILE && passes < 10 * MAX_ERRORS_PER_FILE {
        passes += 1;
        let Ok(rest) = toml::to_string(&table) else {
            break;
        };
        let next = match checked(origin, &rest, env) {
            Ok(_) => break,
            Err(ConfigError::Invalid {
                field, expected, ..
            }) => {
                let follows = |(t, whole): &(String, bool)| {
                    let within = |table: &str| {
                        !table.is_empty()
                            && (field == table || field.starts_with(&format!("{table}.")))
                    };
                    *t == field
                        || t.starts_with(&format!("{field}."))
                        || if *whole {
                            within(t)
                        } else {
                            within(t.rsplit_once('.').map_or("", |(table, _)| table))
                        }
                };
                if !taken.iter().any(follows) {
                    found.push(ConfigError::Invalid {
                        origin: at_line(origin, text, &field),
                        field: field.clone(),
                        expected,
                    });
                }
                (field, false)
            }
            // Not a field's error: most likely the field last set aside is required
            // (a mapping's `path`). Its table is set aside instead, once.
            Err(_) => {
                let Some((table, _)) = taken
                    .last()
                    .filter(|(_, whole)| !whole)
                    .and_then(|(t, _)| t.rsplit_once('.'))
                else {
                    break;
                };
                (table.to_string(), true)
            }
        };
        if !take(&mut table, &next.0) {
            break;
        }
        taken.push(next);
    }
    found
}

/// Removes the value at a dotted path (`source.pagination.size`); false when there is
/// none (or the path indexes a list).
fn take(table: &mut toml::Table, path: &str) -> bool {
    if path.is_empty() || path.contains('[') {
        return false;
    }
    let mut parts: Vec<&str> = path.split('.').collect();
    let Some(last) = parts.pop() else {
        return false;
    };
    let mut at = table;
    for p in parts {
        match at.get_mut(p).and_then(toml::Value::as_table_mut) {
            Some(t) => at = t,
            None => return false,
        }
    }
    at.remove(last).is_some()
}

/// One config file's text, parsed and validated as `validate_dir` validates each file;
/// `origin` names it in errors.
pub fn validate_text(
    origin: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(IntegrationFile, Connector), ConfigError> {
    // A field's error names the line that sets it (or its table's), as TOML syntax
    // errors name theirs.
    checked(origin, text, env).map_err(|e| match e {
        ConfigError::Invalid {
            origin,
            field,
            expected,
        } => ConfigError::Invalid {
            origin: at_line(&origin, text, &field),
            field,
            expected,
        },
        other => other,
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

/// Stores (inserts or replaces) one config. `lastSync` and the cursor are kept.
pub async fn apply(store: &Store, file: &IntegrationFile) -> Result<Applied, StoreError> {
    let now = DateTime::now();
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
