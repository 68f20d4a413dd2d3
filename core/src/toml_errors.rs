//! A TOML file's errors said field by field, each at its line, and as many of them as a
//! run can find (the first [`MAX_ERRORS_PER_FILE`] in the file's order): integration configs (`configs validate`,
//! the admin API) and `sluice.toml` alike.
//!
//! After the first error, its field is set aside (taken out of the file) and the rest
//! checked again, until the rest passes, the error points at no field (a syntax error, a
//! required top-level field set aside), or the limit is reached. A field is wrong by the
//! checks, or by TOML's reading of the file (an unknown field, a value of the wrong type;
//! a table missing a field is set aside whole). An error that may follow from a setting
//! aside is not said: in the table of a `type` set aside (`auth.type` gone, `auth.key` no
//! longer fits), or in a field the format relates to one set aside (a config's `[target]`
//! and its mappings), so that each error said is one the file has as written; a field
//! beside another is checked on its own, and an unknown field's going changes nothing. A
//! required field set aside (or one whose default, in its place, the checks refuse or
//! make another field needed: an empty `[push] collection`, a `[target] collection` of
//! `products` asking for a `productId` mapping) gets a stand-in value when the format
//! offers one; otherwise
//! (a mapping's table without its `path`) its table is set aside, and errors in it, or
//! naming it, are not said. An element of an array of tables set aside whole
//! (`[[schedules]]`) shifts the elements after it: their errors are said with the indices
//! the file has.

use serde::de::DeserializeOwned;

use crate::ConfigError;

/// The most errors said of one file: the first in the file's order.
pub const MAX_ERRORS_PER_FILE: usize = 10;

/// The most errors looked for in one file, so that the [`MAX_ERRORS_PER_FILE`] said are
/// the first in the file's order (the search finds them in the order the format reads
/// its fields, not the file's), not the first found.
const ERRORS_SEARCHED: usize = 50;

/// What is said of a file whose errors reached [`MAX_ERRORS_PER_FILE`]: it may have
/// more, which were not said.
pub fn more_errors_note(file: &str, found: usize) -> Option<String> {
    (found >= MAX_ERRORS_PER_FILE)
        .then(|| format!("{file}: the first {found} errors in the file's order; it may have more"))
}

/// A check of a file's text (the whole file, or what is left of it): its first error.
pub type Check<'a> = &'a dyn Fn(&str) -> Result<(), ConfigError>;

/// What a file's format adds to the search.
pub struct Rules {
    /// What to add to TOML's message for an unknown field, if anything (a hint for a
    /// slip of the file's format).
    pub hint: fn(&str) -> Option<String>,
    /// Whether an error at `field` (the second) may follow from setting `taken` (the
    /// first) aside, beyond what the search tells by itself (the same table after its
    /// `type`, the field itself): the checks across tables the format makes (a config's
    /// `[target]` names the mappings it needs).
    pub related: fn(&str, &str) -> bool,
    /// A value that passes the checks for a required field (by its path), put in place of
    /// one set aside so that the rest of its table is still checked.
    pub placeholder: fn(&str) -> Option<toml::Value>,
}

/// The line (1-based) of `text` (a TOML file) that sets `field` (a dotted path such as
/// `mapping.productId.path` or `schedules[1].cron`, as errors name fields): the key's line
/// (a list's element's own line; a table's header, `[[schedules]]` counting from 0), or,
/// for a key the file does not set (a default found wrong), its table's header. `None`
/// when neither is found (a field set by default at the top level, a table the file
/// does not have). Found by the TOML parser's spans, so a key inside an inline table or
/// across lines, or text inside a multi-line string that looks like a header or a key,
/// is read as TOML reads it.
pub fn line_of(text: &str, field: &str) -> Option<usize> {
    let (root, _) = toml::de::DeTable::parse_recoverable(text);
    let line = |at: usize| text[..at.min(text.len())].matches('\n').count() + 1;
    let parts: Vec<&str> = field.split('.').collect();
    let mut table = root.get_ref();
    // The header (or first key) of the deepest table found so far.
    let mut table_line = None;
    let mut i = 0;
    while i < parts.len() {
        // A key with a dot in it (`"a.b"`) is named as two parts: the longest that is a
        // key of this table.
        let found = (i + 1..=parts.len()).rev().find_map(|end| {
            let (name, index) =
                path_segment(&parts[i..end].join(".")).map(|(n, x)| (n.to_string(), x))?;
            let (key, value) = table.iter().find(|(k, _)| k.get_ref() == &name)?;
            Some((end, key, value, index))
        });
        let Some((end, key, mut value, index)) = found else {
            return table_line;
        };
        let mut at = key.span().start;
        if let Some(index) = index {
            match value.get_ref() {
                toml::de::DeValue::Array(items) => match items.get(index) {
                    Some(item) => {
                        value = item;
                        at = item.span().start;
                    }
                    None => return Some(line(at)),
                },
                _ => return Some(line(at)),
            }
        }
        if end == parts.len() {
            return Some(line(at));
        }
        match value.get_ref() {
            toml::de::DeValue::Table(inner) => {
                table = inner;
                table_line = Some(line(at));
            }
            _ => return Some(line(at)),
        }
        i = end;
    }
    table_line
}

/// `origin`, with the line of `text` that sets `field` (or its table's header), if found.
pub fn at_line(origin: &str, text: &str, field: &str) -> String {
    line_and_origin(origin, text, field).1
}

/// The line of `text` that sets `field`, if found, and `origin` with it, as [`at_line`]
/// says it: one search for both.
pub fn line_and_origin(origin: &str, text: &str, field: &str) -> (Option<usize>, String) {
    let line = line_of(text, field);
    let at = match line {
        Some(line) => format!("{origin}:{line}"),
        None => origin.to_string(),
    };
    (line, at)
}

/// `first`, the error `check` found in `text` (read as a `T`), and the others: the first
/// [`MAX_ERRORS_PER_FILE`] in the file's order (those without a line last), each said at
/// its field's line.
pub fn all_errors<T: DeserializeOwned>(
    origin: &str,
    text: &str,
    first: ConfigError,
    check: Check,
    rules: &Rules,
) -> Vec<ConfigError> {
    let mut all = later_errors::<T>(origin, text, &first, check, rules);
    all.insert(0, said_at_line::<T>(origin, text, first, rules));
    first_in_file(&mut all, ConfigError::line);
    all
}

/// Sorts a file's errors in its order and keeps the first [`MAX_ERRORS_PER_FILE`]; those
/// without a line (a required table missing: they concern the file as a whole) are kept
/// whatever their number, after the others.
pub fn first_in_file<T>(errors: &mut Vec<T>, line: impl Fn(&T) -> Option<usize>) {
    let (mut lined, unlined): (Vec<T>, Vec<T>) = errors.drain(..).partition(|e| line(e).is_some());
    lined.sort_by_key(|e| line(e));
    let unlined: Vec<T> = unlined.into_iter().take(MAX_ERRORS_PER_FILE).collect();
    lined.truncate(MAX_ERRORS_PER_FILE - unlined.len());
    lined.extend(unlined);
    *errors = lined;
}

/// `e`, an error of `text` (read as a `T`) from `origin`, at the line of its field: a
/// check's error at the line that sets the field (or its table's header), and TOML's
/// error for a field said as a check's is (TOML's own words, with the line quoted, for
/// a syntax error). An error from elsewhere (an environment variable) is left as it is.
fn said_at_line<T: DeserializeOwned>(
    origin: &str,
    text: &str,
    e: ConfigError,
    rules: &Rules,
) -> ConfigError {
    match e {
        ConfigError::Parse { origin: ref o, .. } if o == origin => {
            field_error::<T>(origin, text, text, rules, &Gone::default()).map_or(e, |(_, e)| e)
        }
        ConfigError::Invalid {
            origin: o,
            field,
            expected,
        } if o == origin => ConfigError::Invalid {
            origin: at_line(origin, text, &field),
            field,
            expected,
        },
        other => other,
    }
}

/// The errors after `first`; see the module's documentation.
fn later_errors<T: DeserializeOwned>(
    origin: &str,
    text: &str,
    first: &ConfigError,
    check: Check,
    rules: &Rules,
) -> Vec<ConfigError> {
    // The first error's field: named by the check, or where TOML's error points (an
    // unknown field, a value of the wrong type, a table missing a field).
    let first = match first {
        ConfigError::Invalid {
            origin: o, field, ..
        } if o == origin => Taken::field(field.clone()),
        ConfigError::Parse { origin: o, .. } if o == origin => match toml_error_at::<T>(text) {
            Some((field, is_table, message)) => Taken::of_toml(field, is_table, &message),
            None => return Vec::new(),
        },
        _ => return Vec::new(),
    };
    let Ok(mut table) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let mut gone = Gone::default();
    // What was set aside (by the file's paths): a field (an error in its table may
    // follow from it), or a table whole (an error inside it, or naming it, may follow):
    // one missing a field, or one left unreadable by setting a required field aside.
    let mut found = Vec::new();
    if !set_aside(&mut table, &mut gone, &first.path) {
        return found;
    }
    let mut taken = vec![first];
    let mut placed: Vec<String> = Vec::new();
    // Each pass sets something aside, so a file has fewer passes than fields; the bound
    // is for files of thousands of invalid fields.
    let mut passes = 0;
    while found.len() + 1 < ERRORS_SEARCHED && passes < 5 * ERRORS_SEARCHED {
        passes += 1;
        let Ok(rest) = toml::to_string(&table) else {
            break;
        };
        let error = match check(&rest) {
            Ok(()) => break,
            Err(ConfigError::Invalid {
                origin: o,
                field,
                expected,
            }) if o == origin => {
                let field = gone.original(&field);
                // A check comparing the field with one set aside (now at its default)
                // names that one: `initial_backoff_ms` (200) to 300000.
                let named = taken.iter().any(|t| t.named_in(&expected));
                Some((
                    Taken::field(field.clone()),
                    true,
                    named,
                    ConfigError::Invalid {
                        origin: at_line(origin, text, &field),
                        field,
                        expected,
                    },
                ))
            }
            // An unknown field or a value of the wrong type is wrong as written, whatever
            // was set aside; a missing field may be one set aside.
            Err(ConfigError::Parse { origin: o, .. }) if o == origin => {
                field_error::<T>(origin, text, &rest, rules, &gone).map(|(taken, error)| {
                    let may_follow = taken.whole;
                    (taken, may_follow, false, error)
                })
            }
            // From elsewhere (an environment variable): the file cannot be rid of it.
            Err(_) => break,
        };
        // A table left without a field that was set aside (a schedule's `cron`), or a
        // check refusing that field's default in its place (an empty `[push]
        // collection`): a value the format offers for it is put there instead, once, so
        // that the table's other fields are still checked.
        // (A check's error that may follow from the field last set aside: the default in
        // its place, `products` for a `[target] collection`, asks for a mapping.)
        let missing = error.as_ref().is_none_or(|(next, may_follow, ..)| {
            next.whole
                || (*may_follow
                    && taken
                        .last()
                        .is_some_and(|t| t.path == next.path || t.may_cause(&next.path, rules)))
        });
        if let Some(last) = taken.last().filter(|t| missing && !t.whole) {
            if !placed.contains(&last.path) {
                if let Some(value) = (rules.placeholder)(&last.path) {
                    placed.push(last.path.clone());
                    if put(&mut table, &gone.current(&last.path), value) {
                        continue;
                    }
                }
            }
        }
        let next = match error {
            Some((next, may_follow, named, error)) => {
                if !(may_follow && (named || taken.iter().any(|t| t.may_cause(&next.path, rules))))
                {
                    found.push(error);
                }
                next
            }
            // An error that points at no field: most likely the field last set aside is
            // required at the top level. Its table, if it has one, is set aside instead.
            None => {
                let Some((table, _)) = taken
                    .last()
                    .filter(|t| !t.whole)
                    .and_then(|t| t.path.rsplit_once('.'))
                else {
                    break;
                };
                Taken {
                    path: table.to_string(),
                    whole: true,
                    unknown: false,
                }
            }
        };
        if !set_aside(&mut table, &mut gone, &next.path) {
            break;
        }
        taken.push(next);
    }
    found
}

/// What was set aside, by the file's path.
struct Taken {
    path: String,
    /// A table (one missing a field, or one left unreadable by setting a required field
    /// of it aside), rather than a field.
    whole: bool,
    /// A field unknown to the file's format, which nothing else reads.
    unknown: bool,
}

impl Taken {
    fn field(path: String) -> Self {
        Self {
            path,
            whole: false,
            unknown: false,
        }
    }

    /// What TOML's error at `path` (with `message`) sets aside.
    fn of_toml(path: String, is_table: bool, message: &str) -> Self {
        Self {
            path,
            whole: is_table,
            unknown: message.starts_with("unknown field"),
        }
    }

    /// Whether a check's `expected` names this field (`` `initial_backoff_ms` `` or
    /// `` `s3.access_key` ``): it compared the two, and this one is now at its default.
    fn named_in(&self, expected: &str) -> bool {
        let last = self.path.rsplit('.').next().unwrap_or(&self.path);
        !self.unknown
            && (expected.contains(&format!("`{}`", self.path))
                || expected.contains(&format!("`{last}`")))
    }

    /// Whether an error at `field` may follow from setting this aside: it is this field,
    /// inside it (a table taken whole) or holds it; it is in the table of a `type` set
    /// aside (what the other fields of a table may hold depends on its type); or the
    /// format relates the two. An unknown field's going changes nothing else, and a field
    /// beside another is checked on its own (a cron's hour and its time zone).
    fn may_cause(&self, field: &str, rules: &Rules) -> bool {
        let within = |table: &str| {
            !table.is_empty() && (field == table || field.starts_with(&format!("{table}.")))
        };
        let taken = &self.path;
        let table = taken.rsplit_once('.').map_or("", |(table, _)| table);
        let is_type = taken.rsplit('.').next() == Some("type");
        !self.unknown
            && (within(taken)
                || taken.starts_with(&format!("{field}."))
                || (is_type && within(table))
                || (rules.related)(taken, field))
    }
}

/// The TOML error of reading `rest` (`text`, or what is left of it) as a `T`, said of the
/// field it points at, at that field's line in `text`; with the field's path (as `text`
/// has it) and what setting it aside takes. `None` when it points at no field.
fn field_error<T: DeserializeOwned>(
    origin: &str,
    text: &str,
    rest: &str,
    rules: &Rules,
    gone: &Gone,
) -> Option<(Taken, ConfigError)> {
    let (field, is_table, message) = toml_error_at::<T>(rest)?;
    let mut message = plain_types(&message);
    let field = gone.original(&field);
    let taken = Taken::of_toml(field.clone(), is_table, &message);
    message.extend((rules.hint)(&message));
    let what = if is_table { "table" } else { "field" };
    let error = ConfigError::Parse {
        origin: at_line(origin, text, &field),
        message: format!("{what} `{field}`: {message}"),
    };
    Some((taken, error))
}

/// TOML's message with the Rust type it ends on (`..., expected usize`) said as what the
/// value should be (`expected a whole number, 0 or more`; a bounded one with its range).
/// Only the end is read: a quoted value holding such words is left as it is.
fn plain_types(message: &str) -> String {
    const TYPES: [(&str, &str); 12] = [
        ("usize", "a whole number, 0 or more"),
        ("u64", "a whole number, 0 or more"),
        ("u32", "a whole number from 0 to 4294967295"),
        ("u16", "a whole number from 0 to 65535"),
        ("u8", "a whole number from 0 to 255"),
        ("isize", "a whole number"),
        ("i64", "a whole number"),
        ("i32", "a whole number from -2147483648 to 2147483647"),
        ("i16", "a whole number from -32768 to 32767"),
        ("i8", "a whole number from -128 to 127"),
        ("f64", "a number"),
        ("f32", "a number"),
    ];
    let Some((before, named)) = message.rsplit_once("expected ") else {
        return message.to_string();
    };
    match TYPES.iter().find(|(name, _)| named.trim_end() == *name) {
        Some((_, words)) => format!("{before}expected {words}"),
        None => message.to_string(),
    }
}

/// Where the TOML error of reading `text` as a `T` points: the path of the deepest field
/// whose key or value holds it (a table when a field is missing from it), whether that
/// is a table, and the error's message without its quoted line. `None` for an error that
/// points nowhere in a table (a syntax error, a field missing at the top level).
fn toml_error_at<T: DeserializeOwned>(text: &str) -> Option<(String, bool, String)> {
    let error = toml::from_str::<T>(text).err()?;
    // A field missing at the top level points at the start of the file (an empty span).
    let at = error.span().filter(|at| !at.is_empty())?;
    let parsed = toml::de::DeTable::parse(text).ok()?;
    let (path, is_table) = field_at(parsed.get_ref(), &at)?;
    Some((path, is_table, error.message().trim_end().to_string()))
}

/// The path of the deepest entry of `table` whose key or value holds the bytes `at`.
fn field_at(table: &toml::de::DeTable, at: &std::ops::Range<usize>) -> Option<(String, bool)> {
    for (key, value) in table.iter() {
        let name = key.get_ref();
        if let Some((below, is_table)) = value_at(value, at) {
            return Some((format!("{name}{below}"), is_table));
        }
        if holds(key.span(), at) {
            let is_table = matches!(value.get_ref(), toml::de::DeValue::Table(_));
            return Some((name.to_string(), is_table));
        }
    }
    None
}

/// Where in `value` the bytes `at` are, as a path below it (`""`: the value itself,
/// `.key`, `[2].key`), and whether that is a table: an entry inside first, as a table's
/// span can cover only its header.
fn value_at(
    value: &toml::Spanned<toml::de::DeValue>,
    at: &std::ops::Range<usize>,
) -> Option<(String, bool)> {
    let inside = match value.get_ref() {
        toml::de::DeValue::Table(inner) => {
            field_at(inner, at).map(|(path, is_table)| (format!(".{path}"), is_table))
        }
        toml::de::DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            value_at(item, at).map(|(below, is_table)| (format!("[{i}]{below}"), is_table))
        }),
        _ => None,
    };
    inside.or_else(|| {
        holds(value.span(), at).then(|| {
            let is_table = matches!(value.get_ref(), toml::de::DeValue::Table(_));
            (String::new(), is_table)
        })
    })
}

fn holds(span: std::ops::Range<usize>, at: &std::ops::Range<usize>) -> bool {
    span.start <= at.start && at.end <= span.end
}

/// Elements of arrays set aside whole, by the array's path and the element's index as
/// the file has them: the elements after one shift down, and errors of what is left are
/// said with the file's indices.
#[derive(Default)]
struct Gone(Vec<(String, usize)>);

impl Gone {
    /// `path` (with the indices of what is left) with the file's indices.
    fn original(&self, path: &str) -> String {
        self.map(path, true)
    }

    /// `path` (with the file's indices) with the indices of what is left.
    fn current(&self, path: &str) -> String {
        self.map(path, false)
    }

    fn map(&self, path: &str, to_original: bool) -> String {
        // The path so far as the file has it (what arrays are known by), and as asked.
        let (mut file, mut out) = (String::new(), String::new());
        for (n, segment) in path.split('.').enumerate() {
            let dot = if n == 0 { "" } else { "." };
            let Some((name, Some(i))) = path_segment(segment) else {
                file.push_str(&format!("{dot}{segment}"));
                out.push_str(&format!("{dot}{segment}"));
                continue;
            };
            let array = format!("{file}{dot}{name}");
            let mut removed: Vec<usize> = self
                .0
                .iter()
                .filter(|(a, _)| *a == array)
                .map(|(_, i)| *i)
                .collect();
            removed.sort_unstable();
            let (in_file, mapped) = if to_original {
                // The i-th element left is the file's first index past i others left.
                let mut k = i;
                for r in &removed {
                    if *r <= k {
                        k += 1;
                    }
                }
                (k, k)
            } else {
                (i, i - removed.iter().filter(|r| **r < i).count())
            };
            file.push_str(&format!("{dot}{name}[{in_file}]"));
            out.push_str(&format!("{dot}{name}[{mapped}]"));
        }
        out
    }
}

/// Sets the field at `path` (as the file has it) aside: removes it from `table`, noting
/// an array's element taken whole. False when there is none to remove.
fn set_aside(table: &mut toml::Table, gone: &mut Gone, path: &str) -> bool {
    if !take(table, &gone.current(path)) {
        return false;
    }
    if let Some((array, i)) = path
        .strip_suffix(']')
        .and_then(|p| p.rsplit_once('['))
        .and_then(|(array, i)| Some((array.to_string(), i.parse().ok()?)))
    {
        gone.0.push((array, i));
    }
    true
}

/// One segment of a path: its key, and its index when it names an element of an array
/// (`schedules[1]`); `None` when the index is not a number.
fn path_segment(segment: &str) -> Option<(&str, Option<usize>)> {
    match segment.split_once('[') {
        None => Some((segment, None)),
        Some((name, rest)) => Some((name, Some(rest.strip_suffix(']')?.parse().ok()?))),
    }
}

/// The table at a path (`schedules[1]`, `source.pagination`).
fn table_at<'t>(table: &'t mut toml::Table, path: &str) -> Option<&'t mut toml::Table> {
    let mut at = table;
    for p in path.split('.') {
        let (name, index) = path_segment(p)?;
        let value = at.get_mut(name)?;
        let value = match index {
            None => value,
            Some(i) => value.as_array_mut()?.get_mut(i)?,
        };
        at = value.as_table_mut()?;
    }
    Some(at)
}

/// The table holding a path's last segment, and that segment (`source.pagination.size`:
/// the table `source.pagination`, `size`).
fn holder<'t, 'p>(
    table: &'t mut toml::Table,
    path: &'p str,
) -> Option<(&'t mut toml::Table, (&'p str, Option<usize>))> {
    let (at, last) = match path.rsplit_once('.') {
        Some((parent, last)) => (table_at(table, parent)?, last),
        None => (table, path),
    };
    Some((at, path_segment(last)?))
}

/// Sets the value at a path whose table exists (`schedules[1].cron`); false when the
/// table does not.
fn put(table: &mut toml::Table, path: &str, value: toml::Value) -> bool {
    match holder(table, path) {
        Some((at, (key, None))) => {
            at.insert(key.to_string(), value);
            true
        }
        _ => false,
    }
}

/// Removes the value at a path (`source.pagination.size`, `schedules[1].cron`,
/// `schedules[1]`); false when there is none.
fn take(table: &mut toml::Table, path: &str) -> bool {
    if path.is_empty() {
        return false;
    }
    match holder(table, path) {
        Some((at, (key, None))) => at.remove(key).is_some(),
        Some((at, (key, Some(i)))) => match at.get_mut(key).and_then(toml::Value::as_array_mut) {
            Some(items) if i < items.len() => {
                items.remove(i);
                true
            }
            _ => false,
        },
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_types_are_said_as_what_the_value_should_be() {
        assert_eq!(
            plain_types("invalid type: string \"x\", expected usize"),
            "invalid type: string \"x\", expected a whole number, 0 or more"
        );
        assert_eq!(
            plain_types("invalid value: integer `5000000000`, expected u32"),
            "invalid value: integer `5000000000`, expected a whole number from 0 to 4294967295"
        );
        assert_eq!(
            plain_types("invalid type: boolean `true`, expected f64"),
            "invalid type: boolean `true`, expected a number"
        );
        // Only the type the message ends on: not words inside a quoted value.
        assert_eq!(
            plain_types("invalid type: string \"expected u8\", expected a map"),
            "invalid type: string \"expected u8\", expected a map"
        );
        assert_eq!(plain_types("expected u8s"), "expected u8s");
        assert_eq!(plain_types("unknown field `x`"), "unknown field `x`");
    }

    /// Past the limit, the first in the file's order are kept, and those without a line
    /// (a required table missing) are never the ones left out.
    #[test]
    fn the_first_errors_in_the_file_are_kept_with_those_without_a_line() {
        let mut errors: Vec<(Option<usize>, usize)> =
            (0..12).rev().map(|n| (Some(n + 1), n)).collect();
        errors.insert(3, (None, 99));
        first_in_file(&mut errors, |e| e.0);
        let kept: Vec<Option<usize>> = errors.iter().map(|e| e.0).collect();
        let mut expected: Vec<Option<usize>> = (1..=9).map(Some).collect();
        expected.push(None);
        assert_eq!(kept, expected);
    }

    #[test]
    fn a_field_is_found_on_its_line() {
        let text = "name = \"shop\"\ntype = \"IMPORT\"\n\n[source]\nrecords = \"$.data[*]\"\n[source.pagination]\ntype = \"page\"\n\n[mapping.productId]\npath = \"$.id\"\n[ mapping.\"title\" ]\n  path = \"$.name\"\n";
        assert_eq!(line_of(text, "type"), Some(2));
        assert_eq!(line_of(text, "source.records"), Some(5));
        assert_eq!(line_of(text, "source.pagination.type"), Some(7));
        assert_eq!(line_of(text, "mapping.productId.path"), Some(10));
        assert_eq!(line_of(text, "mapping.productId"), Some(9));
        assert_eq!(line_of(text, "source.pagination"), Some(6));
        assert_eq!(line_of(text, "mapping.title.path"), Some(12));
        // Not set: its table's header; no table either: the nearest one there is.
        assert_eq!(line_of(text, "mapping.productId.type"), Some(9));
        assert_eq!(line_of(text, "source.pagination.size"), Some(6));
        assert_eq!(line_of(text, "target.key"), None);
        assert_eq!(line_of(text, "schedule"), None);
    }

    #[test]
    fn arrays_of_tables_are_found_by_index() {
        let text = "[server]\nwrite_keys = [\"a\", \"b\"]\n\n[[schedules]]\nname = \"one\"\ncron = \"x\"\n\n[[schedules]]\nname = \"two\"\n\n[plugins]\nfuel = true\n";
        assert_eq!(line_of(text, "server.write_keys[1]"), Some(2));
        assert_eq!(line_of(text, "schedules[0].cron"), Some(6));
        assert_eq!(line_of(text, "schedules[1].name"), Some(9));
        assert_eq!(line_of(text, "schedules[1]"), Some(8));
        // Not set in the second: its header.
        assert_eq!(line_of(text, "schedules[1].cron"), Some(8));
        assert_eq!(line_of(text, "plugins.fuel"), Some(12));
    }

    /// Read as TOML reads the file: a field in an inline table across lines, a key with
    /// a dot, an element of a list on its own line; and not text in a multi-line string
    /// that looks like a header or a key.
    #[test]
    fn what_a_line_scan_would_misread_is_found_where_toml_has_it() {
        let text = "[source]\npagination = { type = \"page\",\n  size = 5 }\n\n[mapping]\n\"a.b\" = { path = \"$.c\" }\n\n[[schedules]]\nname = \"one\"\nnotes = \"\"\"\n[not_a_header]\ncron = \"x\"\n\"\"\"\ncron = \"y\"\nlist = [\n  \"one\",\n  \"two\",\n]\n";
        assert_eq!(line_of(text, "source.pagination.size"), Some(3));
        assert_eq!(line_of(text, "source.pagination.type"), Some(2));
        assert_eq!(line_of(text, "mapping.a.b.path"), Some(6));
        assert_eq!(line_of(text, "schedules[0].cron"), Some(14));
        assert_eq!(line_of(text, "schedules[0].list[1]"), Some(17));
        assert_eq!(line_of(text, "schedules[0].timezone"), Some(8));
        assert_eq!(line_of(text, "not_a_header"), None);
    }

    #[test]
    fn a_dotted_key_is_found_on_its_line() {
        let text = "[mapping]\nid.path = \"$.id\"\n\"id\" . type = \"strng\"\n";
        assert_eq!(line_of(text, "mapping.id.type"), Some(3));
        assert_eq!(line_of(text, "mapping.id.path"), Some(2));
        // The table `mapping.id`, made by its dotted keys: the first that sets it.
        assert_eq!(line_of(text, "mapping.id"), Some(2));
    }

    #[test]
    fn paths_of_what_is_left_map_to_the_file_s() {
        let gone = Gone(vec![("schedules".into(), 0), ("schedules".into(), 2)]);
        // Left: the file's 1, 3, 4.
        assert_eq!(gone.original("schedules[0].cron"), "schedules[1].cron");
        assert_eq!(gone.original("schedules[1]"), "schedules[3]");
        assert_eq!(gone.original("schedules[2].name"), "schedules[4].name");
        assert_eq!(gone.current("schedules[3].cron"), "schedules[1].cron");
        assert_eq!(gone.current("schedules[4]"), "schedules[2]");
        assert_eq!(gone.original("plugins.fuel"), "plugins.fuel");
        assert_eq!(
            gone.original("server.write_keys[0]"),
            "server.write_keys[0]"
        );
        let mut table: toml::Table = "[[s]]\na = 1\nb = 2\n[[s]]\na = 3\n".parse().unwrap();
        let mut gone = Gone::default();
        assert!(set_aside(&mut table, &mut gone, "s[0]"));
        assert!(set_aside(&mut table, &mut gone, "s[1].a"));
        assert!(!set_aside(&mut table, &mut gone, "s[1].a"), "gone already");
        assert_eq!(toml::to_string(&table).unwrap().trim(), "[[s]]");
    }
}
