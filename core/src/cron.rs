//! Cron expressions as Sluice reads them: with a seconds field (6 or 7 fields), parsed by
//! the same parser the scheduler fires with, so a config that validates is one that runs.

/// What a valid expression looks like, for error messages.
pub const EXPECTED: &str = "a cron expression with seconds (6 or 7 fields, e.g. `0 */15 * * * *`)";

/// Parses `expr`; the error says what was expected and what is wrong with `expr`. A day of
/// the month and a day of the week must both match (`0 0 2 1-7 * MON`: the first Monday),
/// as the scheduler's triggers read them, so the next fire shown is the one that comes.
///
/// Refused too: every second of only some minutes (`* 0 2 * * *`, meant as "at 02:00",
/// would fire 60 times), and an expression that never fires again (a past year).
pub fn parse(expr: &str) -> Result<croner::Cron, String> {
    let cron = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expr)
        .map_err(|e| match wrong_field(expr) {
            Some(field) => format!("{EXPECTED}; `{expr}` is not one: {field}"),
            None => format!("{EXPECTED}; `{expr}` is not one: {e}"),
        })?;
    // Every second of only some minutes is a slip for "once in those minutes"; every
    // second of every minute (`* * * * * *`) is what it says.
    let mut fields = expr.split_whitespace();
    let every = |f: Option<&str>| matches!(f, Some("*" | "*/1"));
    if every(fields.next()) && !every(fields.next()) {
        return Err(format!(
            "a cron expression that fires once in the minutes it matches; `{expr}` fires every second of each (the first field is seconds): write `0` there"
        ));
    }
    if cron
        .find_next_occurrence(&chrono::Utc::now(), false)
        .is_err()
    {
        return Err(format!(
            "a cron expression that fires again; `{expr}` never does (a past year, or a date that does not exist)"
        ));
    }
    Ok(cron)
}

/// The fields of an expression with seconds: name and values (a year may follow).
const FIELDS: [(&str, &str); 7] = [
    ("second", "0-59"),
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day of the month", "1-31, L, W"),
    ("month", "1-12 or JAN-DEC"),
    ("day of the week", "0-7 or SUN-SAT, L, #"),
    ("year", "1-5000"),
];

/// Which field of an expression the parser refuses, said with the values it takes; the
/// parser's own error names none. Each field is tried alone, the others matching all.
fn wrong_field(expr: &str) -> Option<String> {
    let fields: Vec<&str> = expr.split_whitespace().collect();
    if !(6..=7).contains(&fields.len()) {
        return None;
    }
    let parser = croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build();
    fields.iter().enumerate().find_map(|(i, field)| {
        let probe: Vec<&str> = (0..fields.len())
            .map(|j| match j {
                _ if j == i => *field,
                0..=2 => "0",
                _ => "*",
            })
            .collect();
        let (name, values) = FIELDS[i];
        parser
            .parse(&probe.join(" "))
            .is_err()
            .then(|| format!("field {} (the {name}: {values}) is `{field}`", i + 1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expressions_need_seconds_and_valid_fields() {
        assert!(parse("0 */15 * * * *").is_ok());
        assert!(parse("0 0 2 * * * 2027").is_ok());
        let five = parse("*/15 * * * *").unwrap_err();
        assert!(five.contains("`*/15 * * * *` is not one"), "{five}");
        let out_of_range = parse("0 0 25 * * *").unwrap_err();
        assert!(out_of_range.starts_with(EXPECTED), "{out_of_range}");
        // The field the parser refuses is named, with the values it takes.
        assert!(
            out_of_range.ends_with("`0 0 25 * * *` is not one: field 3 (the hour: 0-23) is `25`"),
            "{out_of_range}"
        );
        for (expr, said) in [
            ("99 0 2 * * *", "field 1 (the second: 0-59) is `99`"),
            ("0 0 2 32 * *", "field 4 (the day of the month"),
            (
                "0 0 2 * 13 *",
                "field 5 (the month: 1-12 or JAN-DEC) is `13`",
            ),
            ("0 0 2 * * MON-XYZ", "field 6 (the day of the week"),
            ("0 0 2 * * * 6000", "field 7 (the year: 1-5000) is `6000`"),
        ] {
            let err = parse(expr).unwrap_err();
            assert!(err.contains(said), "{expr}: {err}");
        }
        assert!(parse("0 0 2 * * MON-XYZ").is_err());
        // Every second of the minute, and never again: refused, saying why.
        for every_second in ["* 0 2 * * *", "*/1 */5 * * * *"] {
            let err = parse(every_second).unwrap_err();
            assert!(err.contains("every second"), "{err}");
        }
        assert!(
            parse("*/10 * * * * *").is_ok(),
            "sub-minute steps are meant"
        );
        let never = parse("0 0 2 * * * 2020").unwrap_err();
        assert!(never.contains("never does"), "{never}");
    }

    #[test]
    fn day_of_month_and_day_of_week_must_both_match() {
        use chrono::{Datelike, TimeZone};
        let cron = parse("0 0 2 1-7 * MON").unwrap();
        let from = chrono::Utc.with_ymd_and_hms(2026, 12, 4, 0, 0, 0).unwrap();
        let next = cron.find_next_occurrence(&from, false).unwrap();
        assert_eq!(next.weekday(), chrono::Weekday::Mon);
        assert!(next.day() <= 7, "{next}");
        assert_eq!(next.to_rfc3339(), "2026-12-07T02:00:00+00:00");
    }

    #[test]
    fn nicknames_fire_at_second_zero_of_their_period() {
        use chrono::TimeZone;
        // Friday 2026-12-04 05:30:15 UTC.
        let from = chrono::Utc
            .with_ymd_and_hms(2026, 12, 4, 5, 30, 15)
            .unwrap();
        for (nickname, next, fixed) in [
            ("@hourly", "2026-12-04T06:00:00+00:00", false),
            ("@daily", "2026-12-05T00:00:00+00:00", true),
            ("@weekly", "2026-12-06T00:00:00+00:00", true),
            ("@monthly", "2027-01-01T00:00:00+00:00", true),
            ("@yearly", "2027-01-01T00:00:00+00:00", true),
            ("@annually", "2027-01-01T00:00:00+00:00", true),
        ] {
            let cron = parse(nickname).unwrap_or_else(|e| panic!("{nickname}: {e}"));
            let at = cron.find_next_occurrence(&from, false).unwrap();
            assert_eq!(at.to_rfc3339(), next, "{nickname}");
            // A clock change's rules: a fixed time runs once, an hourly job every hour.
            assert_eq!(
                cron.determine_job_type() == croner::JobType::FixedTime,
                fixed,
                "{nickname}"
            );
        }
        assert!(parse("@often").is_err() && parse("@midnight").is_err());
    }
}
