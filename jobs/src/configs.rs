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
            Err(all) => all,
        };
        all.extend(duplicate);
        sort_by_line(&mut all);
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
/// again, until it validates, the error points at no field (a syntax error, a required
/// top-level field taken out), or [`MAX_ERRORS_PER_FILE`] are found. A field is invalid
/// by the checks, or by TOML's reading of the file (an unknown field, a value of the
/// wrong type; a table missing a field is taken out whole). An error in a table a field
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
    // The first error's field: named by the check, or where TOML's error points (an
    // unknown field, a value of the wrong type, a table missing a field).
    let first = match first {
        ConfigError::Invalid { field, .. } => (field.clone(), false),
        ConfigError::Parse { .. } => match toml_error_at(text) {
            Some((field, is_table, _)) => (field, is_table),
            None => return Vec::new(),
        },
        ConfigError::Read { .. } => return Vec::new(),
    };
    let Ok(mut table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    // What was set aside: a field (an error in its table may follow from it), or a table
    // whole (an error inside it, or naming it, may follow): one missing a field, or one
    // left unreadable by setting a required field of it aside.
    let mut found = Vec::new();
    if !take(&mut table, &first.0) {
        return found;
    }
    let mut taken: Vec<(String, bool)> = vec![first];
    // Each pass sets something aside, so a file has fewer passes than fields; the bound
    // is for files of thousands of invalid fields.
    let mut passes = 0;
    while found.len() + 1 < MAX_ERRORS_PER_FILE && passes < 10 * MAX_ERRORS_PER_FILE {
        passes += 1;
        let Ok(rest) = toml::to_string(&table) else {
            break;
        };
        let error = match checked(origin, &rest, env) {
            Ok(_) => break,
            Err(ConfigError::Invalid {
                field, expected, ..
            }) => Some((
                field.clone(),
                false,
                true,
                ConfigError::Invalid {
                    origin: at_line(origin, text, &field),
                    field,
                    expected,
                },
            )),
            // An unknown field or a value of the wrong type is wrong as written, whatever
            // was set aside; a missing field may be one set aside.
            Err(ConfigError::Parse { .. }) => toml_field_error(origin, text, &rest)
                .map(|(field, is_table, error)| (field, is_table, is_table, error)),
            Err(ConfigError::Read { .. }) => break,
        };
        let next = match error {
            Some((field, whole, may_follow, error)) => {
                if !(may_follow && taken.iter().any(|t| follows(t, &field))) {
                    found.push(error);
                }
                (field, whole)
            }
            // An error that points at no field: most likely the field last set aside is
            // required at the top level. Its table, if it has one, is set aside instead.
            None => {
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

/// Whether an error at `field` may follow from setting `taken` aside: it is the same
/// field or inside it, or in the table it was taken from (inside it, when a table was
/// taken whole).
fn follows((taken, whole): &(String, bool), field: &str) -> bool {
    let within = |table: &str| {
        !table.is_empty() && (field == table || field.starts_with(&format!("{table}.")))
    };
    taken == field
        || taken.starts_with(&format!("{field}."))
        || if *whole {
            within(taken)
        } else {
            within(taken.rsplit_once('.').map_or("", |(table, _)| table))
        }
}

/// The TOML error of reading `rest` (`text`, or what is left of it) as a config, said of
/// the field it points at, at that field's line in `text`; with the field's dotted path
/// and whether it is a table. `None` when it points at no field.
fn toml_field_error(origin: &str, text: &str, rest: &str) -> Option<(String, bool, ConfigError)> {
    let (field, is_table, mut message) = toml_error_at(rest)?;
    message.extend(sluice_core::integration::top_level_field_in_a_table(
        &message,
    ));
    let what = if is_table { "table" } else { "field" };
    let error = ConfigError::Parse {
        origin: at_line(origin, text, &field),
        message: format!("{what} `{field}`: {message}"),
    };
    Some((field, is_table, error))
}

/// Where the TOML error of reading `text` as a config points: the dotted path of the
/// deepest field whose key or value holds it (a table when a field is missing from it),
/// whether that is a table, and the error's message without its quoted line. `None` for
/// an error that points nowhere in a table (a syntax error, a field missing at the top
/// level).
fn toml_error_at(text: &str) -> Option<(String, bool, String)> {
    let error = toml::from_str::<IntegrationFile>(text).err()?;
    // A field missing at the top level points at the start of the file (an empty span).
    let at = error.span().filter(|at| !at.is_empty())?;
    let parsed = toml::de::DeTable::parse(text).ok()?;
    let (path, is_table) = field_at(parsed.get_ref(), at)?;
    Some((path, is_table, error.message().trim_end().to_string()))
}

/// The dotted path of the deepest entry of `table` whose key or value holds the bytes
/// `at`: a leaf first (a table's span can cover only its header), else a table. A field
/// missing from a table points at its header.
fn field_at(table: &toml::de::DeTable, at: std::ops::Range<usize>) -> Option<(String, bool)> {
    let holds = |span: std::ops::Range<usize>| span.start <= at.start && at.end <= span.end;
    let mut holder = None;
    for (key, value) in table.iter() {
        let name = key.get_ref().to_string();
        let holds = holds(key.span()) || holds(value.span());
        match value.get_ref() {
            toml::de::DeValue::Table(inner) => {
                if let Some((rest, is_table)) = field_at(inner, at.clone()) {
                    return Some((format!("{name}.{rest}"), is_table));
                }
                if holds {
                    holder = Some((name, true));
                }
            }
            _ if holds => return Some((name, false)),
            _ => {}
        }
    }
    holder
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

/// In the file's order; those without a line (a field missing) last.
fn sort_by_line(errors: &mut [ConfigError]) {
    errors.sort_by_key(|e| e.line().unwrap_or(usize::MAX));
}

/// As [`validate_text`], with up to [`MAX_ERRORS_PER_FILE`] errors, in the file's order,
/// as `validate_dir` names them.
pub fn validate_text_all(
    origin: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(IntegrationFile, Connector), Vec<ConfigError>> {
    validate_text(origin, text, env).map_err(|first| {
        let mut all = later_errors(origin, text, &first, env);
        all.insert(0, first);
        sort_by_line(&mut all);
        all
    })
}

/// One config file's text, parsed and validated as `validate_dir` validates each file;
/// `origin` names it in errors: the first error found.
pub fn validate_text(
    origin: &str,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(IntegrationFile, Connector), ConfigError> {
    // A field's error names the line that sets it (or its table's), as TOML syntax
    // errors name theirs; TOML's error for a field is said as a check's is.
    checked(origin, text, env).map_err(|e| match e {
        ConfigError::Parse { .. } => toml_field_error(origin, text, text).map_or(e, |(.., e)| e),
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
    fn toml_errors_do_not_end_the_search() {
        assert!(validate_text("t.toml", BASE, &|_| None).is_ok());
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
    fn a_missing_field_set_aside_is_not_said() {
        // The path is refused by the check; once it is set aside the mapping has none,
        // which follows from setting it aside.
        let text = format!("{BASE}\n[mapping.a]\npath = \"$..[?(@.x\"\n\n[mapping.b]\npath = \"$.b\"\ntype = \"txt\"\n");
        let all = all_errors(&text);
        assert_eq!(all.len(), 2, "{all:#?}");
        assert!(all[0].contains("field `mapping.a.path`"), "{all:#?}");
        assert!(all[1].contains("field `mapping.b.type`"), "{all:#?}");
        // A required top-level field of the wrong type ends the search: without it the
        // file cannot be read.
        let text = BASE.replace("name = \"t\"", "name = 5")
            + "[mapping.c]\npath = \"$.c\"\ntype = \"txt\"\n";
        let all = all_errors(&text);
        assert_eq!(all.len(), 1, "{all:#?}");
        assert!(
            all[0].starts_with("t.toml:1: field `name`: invalid type: integer `5`"),
            "{all:#?}"
        );
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
