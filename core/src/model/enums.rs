//! The design document's enums, stored as their SCREAMING_SNAKE_CASE names.

use serde::{Deserialize, Serialize};

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored name of this value.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }

            /// Parses a stored name; the error lists what is accepted.
            pub fn parse(text: &str) -> Result<Self, String> {
                match text {
                    $($text => Ok($name::$variant),)+
                    // Read after "expected" where a field is named.
                    other => Err(format!(
                        "one of {}, got `{}`",
                        [$($text),+].join(", "),
                        other
                    )),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> { Self::parse(s) }
        }
    };
}

string_enum! {
    /// `events.eventType`. The design document names PAGE_VIEW and PURCHASE "etc."; the
    /// rest is the usual web / mobile vocabulary. `CUSTOM` carries any other name in
    /// `properties.eventName`.
    EventType {
        PageView => "PAGE_VIEW",
        ScreenView => "SCREEN_VIEW",
        Click => "CLICK",
        FormSubmit => "FORM_SUBMIT",
        Search => "SEARCH",
        AddToCart => "ADD_TO_CART",
        RemoveFromCart => "REMOVE_FROM_CART",
        Checkout => "CHECKOUT",
        Purchase => "PURCHASE",
        Signup => "SIGNUP",
        Login => "LOGIN",
        Logout => "LOGOUT",
        Identify => "IDENTIFY",
        Group => "GROUP",
        Alias => "ALIAS",
        Custom => "CUSTOM",
    }
}

string_enum! {
    /// `sessions.status`.
    SessionStatus {
        Active => "ACTIVE",
        Ended => "ENDED",
        Expired => "EXPIRED",
    }
}

string_enum! {
    /// `admin_users.role`.
    Role {
        Admin => "ADMIN",
        Analyst => "ANALYST",
        User => "USER",
    }
}

string_enum! {
    /// `integration_configs.type`.
    IntegrationType {
        Import => "IMPORT",
        Export => "EXPORT",
    }
}

string_enum! {
    /// `integration_configs.authType`.
    AuthType {
        ApiKey => "API_KEY",
        OAuth => "OAUTH",
        Basic => "BASIC",
        None => "NONE",
    }
}

string_enum! {
    /// `integration_configs.method`.
    HttpMethod {
        Get => "GET",
        Post => "POST",
        Put => "PUT",
    }
}

string_enum! {
    /// `export_jobs.type`. ARCHIVE is the design document's "events older than 90 days
    /// archived to S3".
    ExportJobType {
        DailyAnalytics => "DAILY_ANALYTICS",
        UserData => "USER_DATA",
        EventData => "EVENT_DATA",
        Archive => "ARCHIVE",
    }
}

impl ExportJobType {
    /// Whether it exports a window of days, one partition a day (EVENT_DATA,
    /// DAILY_ANALYTICS): the kinds that refuse a day ARCHIVE took and publish again the
    /// days that received late events.
    pub fn by_day(self) -> bool {
        matches!(
            self,
            ExportJobType::EventData | ExportJobType::DailyAnalytics
        )
    }
}

string_enum! {
    /// `export_jobs.status`.
    ExportJobStatus {
        Pending => "PENDING",
        Running => "RUNNING",
        Completed => "COMPLETED",
        Failed => "FAILED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_round_trip_through_their_stored_names() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()).unwrap(), *t);
            let json = serde_json::to_string(t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
        }
        assert_eq!(
            ExportJobStatus::parse("COMPLETED"),
            Ok(ExportJobStatus::Completed)
        );
    }

    #[test]
    fn unknown_enum_value_lists_the_accepted_ones() {
        let err = Role::parse("ROOT").unwrap_err();
        assert!(err.contains("`ROOT`"), "{err}");
        assert!(err.contains("ADMIN, ANALYST, USER"), "{err}");
    }
}
