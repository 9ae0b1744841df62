//! Every operator setting, declared once: its name, type, default, lower bound and help.
//!
//! The [`Limits`] struct, its `Default`, the `[LIMITS]` log line, the Python keyword
//! arguments of `Server(...)`, the `relaychat-server` flags (with their defaults in
//! `--help`) and the table in docs/SECURITY.md (checked by a test) are all made from the
//! one list in [`settings!`]. Values below a setting's minimum are raised to it here, and
//! only here.

use std::fmt::Write as _;
use std::time::Duration;

use crate::protocol::{DEFAULT_MAX_HEADER, DEFAULT_MAX_LINE};

/// The unit a setting is given in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// A number of bytes.
    Bytes,
    /// A count of things.
    Count,
    /// A duration, given in (fractional) seconds.
    Seconds,
}

impl Unit {
    /// The unit's name as the docs and `--help` show it.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Bytes => "bytes",
            Unit::Count => "count",
            Unit::Seconds => "seconds",
        }
    }
}

/// A setting's value as it crosses from Python or the command line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Number {
    /// A whole number.
    Int(u64),
    /// Seconds (or a whole number given as a float).
    Float(f64),
}

/// What is known about one setting.
#[derive(Debug)]
pub struct Setting {
    /// The keyword (`max_file_size`); the flag is the same with dashes.
    pub name: &'static str,
    /// What the number counts.
    pub unit: Unit,
    /// One line on what it limits.
    pub help: &'static str,
}

/// A value that does not fit a setting.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SettingError {
    /// No setting has this name.
    #[error("unknown setting '{0}'")]
    Unknown(String),
    /// The value is of the wrong kind or out of range.
    #[error("{name}: {why}")]
    Invalid {
        /// The setting.
        name: &'static str,
        /// What is wrong.
        why: String,
    },
}

/// A Rust type a setting can have.
trait Quantity: Sized + Copy {
    const UNIT: Unit;
    fn from_number(n: Number) -> Result<Self, String>;
    fn to_number(self) -> Number;
}

impl Quantity for u64 {
    const UNIT: Unit = Unit::Bytes;
    fn from_number(n: Number) -> Result<Self, String> {
        match n {
            Number::Int(n) => Ok(n),
            Number::Float(f) if f >= 0.0 && f.fract() == 0.0 && f < u64::MAX as f64 => Ok(f as u64),
            Number::Float(f) => Err(format!("{f} is not a whole number of bytes")),
        }
    }
    fn to_number(self) -> Number {
        Number::Int(self)
    }
}

impl Quantity for usize {
    const UNIT: Unit = Unit::Count;
    fn from_number(n: Number) -> Result<Self, String> {
        let n = u64::from_number(n)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }
    fn to_number(self) -> Number {
        Number::Int(self as u64)
    }
}

impl Quantity for Duration {
    const UNIT: Unit = Unit::Seconds;
    fn from_number(n: Number) -> Result<Self, String> {
        let secs = match n {
            Number::Int(n) => n as f64,
            Number::Float(f) => f,
        };
        Duration::try_from_secs_f64(secs).map_err(|_| format!("{secs} is not a duration"))
    }
    fn to_number(self) -> Number {
        Number::Float(self.as_secs_f64())
    }
}

/// Declares every setting once (see the module docs). Each line: doc comment, name, type,
/// unit when the type alone does not say it, default, minimum, help text.
macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident : $ty:ty $([$unit:ident])? = $default:expr, min $min:expr, $help:literal;
    )*) => {
        /// The operator's limits (everything but where to listen and where to save).
        #[derive(Debug, Clone, PartialEq)]
        pub struct Limits {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for Limits {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// Every setting, in the order `--help` and the docs list them.
        pub const SETTINGS: &[Setting] = &[
            $( Setting {
                name: stringify!($name),
                unit: settings!(@unit $ty $(, $unit)?),
                help: $help,
            }, )*
        ];

        impl Limits {
            /// Sets one setting by name, raising a value below its minimum to the minimum.
            pub fn set(&mut self, name: &str, value: Number) -> Result<(), SettingError> {
                match name {
                    $( stringify!($name) => {
                        let v = <$ty as Quantity>::from_number(value).map_err(|why| {
                            SettingError::Invalid { name: stringify!($name), why }
                        })?;
                        self.$name = v.max($min);
                        Ok(())
                    } )*
                    _ => Err(SettingError::Unknown(name.to_owned())),
                }
            }

            /// One setting's value by name.
            pub fn get(&self, name: &str) -> Option<Number> {
                match name {
                    $( stringify!($name) => Some(Quantity::to_number(self.$name)), )*
                    _ => None,
                }
            }
        }
    };
    (@unit $ty:ty) => { <$ty as Quantity>::UNIT };
    (@unit $ty:ty, $unit:ident) => { Unit::$unit };
}

settings! {
    /// How long bytes without a newline wait before they count as one line, on a
    /// connection that has never sent a newline (the lab's client).
    idle_pause: Duration = Duration::from_millis(25), min Duration::ZERO,
        "quiet that ends a line sent without a newline";
    /// Longest chat line, in bytes.
    max_line: usize [Bytes] = DEFAULT_MAX_LINE, min 1,
        "longest chat line (also the username)";
    /// Longest file-port line (username, upload header), in bytes.
    max_header: usize [Bytes] = DEFAULT_MAX_HEADER, min 64,
        "longest file-port line (username, upload header)";
    /// Lines a chat connection may have queued at most (its senders wait past it); past a
    /// quarter of it, its senders are slowed.
    send_queue: usize = 8192, min 1,
        "lines queued for one chat connection at most (its senders wait past it)";
    /// Bytes a chat connection may have queued at most (its senders wait past it).
    send_queue_bytes: usize [Bytes] = 4 << 20, min 1,
        "bytes queued for one chat connection at most (its senders wait past it)";
    /// Bytes queued for a chat connection past which the sessions sending to it stop
    /// reading their own sockets until it has drained to half (flow control).
    send_queue_high_water: usize [Bytes] = 256 << 10, min 1,
        "bytes queued for one chat connection past which its senders are slowed";
    /// How long a write to a peer may make no progress before the peer counts as not
    /// reading and is dropped (chat lines and file forwards alike).
    send_timeout: Duration = Duration::from_secs(30), min Duration::ZERO,
        "how long a peer may take nothing we send before it is dropped";
    /// How long a connection may take to send its username.
    handshake_timeout: Duration = Duration::from_secs(10), min Duration::ZERO,
        "how long a new connection may take to send its username";
    /// How long an upload may go without receiving a byte before it is aborted.
    transfer_timeout: Duration = Duration::from_secs(60), min Duration::ZERO,
        "longest pause inside an upload";
    /// Connections open at once, both ports together.
    max_connections: usize = 10_000, min 1,
        "open connections, both ports together";
    /// Connections open at once from one IP address.
    max_per_address: usize = 256, min 1,
        "open connections from one IP address";
    /// Largest file accepted, in bytes.
    max_file_size: u64 = 4 << 30, min 0,
        "largest file accepted";
    /// Bytes of saved copies one user may store.
    user_quota: u64 = 16 << 30, min 0,
        "bytes of saved copies one user may store";
    /// Free disk space the server always leaves in the data directory, in bytes.
    min_free_disk: u64 = 256 << 20, min 0,
        "free space always left in the data directory";
    /// Messages kept for one registered user while away, at most.
    inbox_max: u64 [Count] = 10_000, min 0,
        "messages kept for one registered user while away";
    /// How long a client that cannot confirm what it received (the lab's, netcat) must stay
    /// connected after its queued messages were written, if it sends nothing, before they
    /// are forgotten (a line it sends after them counts at once).
    inbox_settle: Duration = Duration::from_secs(2), min Duration::ZERO,
        "how long a client that cannot confirm must stay connected after its queued messages before they are forgotten";
    /// Days of message history kept (older messages are deleted every hour).
    history_days: u64 [Count] = 30, min 1,
        "days of message history kept";
    /// Wrong passwords (per name, and per address) that lock it out.
    login_attempts: usize = 5, min 1,
        "wrong passwords, per name and per address, before a lockout";
    /// How long a lockout lasts, and how long failures are remembered.
    login_lockout: Duration = Duration::from_secs(300), min Duration::ZERO,
        "how long a name or address is locked out after too many wrong passwords";
    /// How long the part of a broken upload from our client is kept for it to resume.
    partial_ttl: Duration = Duration::from_secs(86_400), min Duration::ZERO,
        "how long a broken upload's part is kept (counted against the quota) for it to resume";
}

impl Number {
    /// The value as the docs and the `[LIMITS]` line show it.
    pub fn show(self, unit: Unit) -> String {
        match (self, unit) {
            (Number::Float(s), Unit::Seconds) => format!("{s} s"),
            (Number::Int(n), Unit::Bytes) => format!("{n} B"),
            (Number::Int(n), _) => n.to_string(),
            (Number::Float(f), _) => f.to_string(),
        }
    }
}

impl Limits {
    /// `name value` for every setting, as the `[LIMITS]` log line shows them.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (i, s) in SETTINGS.iter().enumerate() {
            if i > 0 {
                out.push_str("; ");
            }
            if let Some(v) = self.get(s.name) {
                let _ = write!(out, "{} {}", s.name, v.show(s.unit));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_reads_back_what_was_set_and_names_are_unique() {
        let mut limits = Limits::default();
        for (i, s) in SETTINGS.iter().enumerate() {
            assert!(SETTINGS[i + 1..].iter().all(|o| o.name != s.name));
            let value = match s.unit {
                Unit::Seconds => Number::Float(7.5),
                _ => Number::Int(1000),
            };
            limits.set(s.name, value).expect("sets");
            assert_eq!(limits.get(s.name), Some(value), "{}", s.name);
        }
    }

    #[test]
    fn values_below_the_minimum_are_raised_in_one_place() {
        let mut limits = Limits::default();
        limits.set("max_header", Number::Int(1)).expect("sets");
        assert_eq!(limits.max_header, 64);
        limits.set("send_queue", Number::Int(0)).expect("sets");
        assert_eq!(limits.send_queue, 1);
    }

    #[test]
    fn bad_values_and_names_are_refused() {
        let mut limits = Limits::default();
        assert_eq!(
            limits.set("nope", Number::Int(1)),
            Err(SettingError::Unknown("nope".into()))
        );
        assert!(limits.set("idle_pause", Number::Float(-1.0)).is_err());
        assert!(limits.set("max_file_size", Number::Float(1.5)).is_err());
        assert_eq!(limits, Limits::default(), "a refused value changes nothing");
    }

    #[test]
    fn the_limits_line_shows_every_setting() {
        let line = Limits::default().describe();
        for s in SETTINGS {
            assert!(line.contains(s.name), "{} missing from {line}", s.name);
        }
        assert!(line.contains("max_line 65536 B"));
        assert!(line.contains("idle_pause 0.025 s"));
    }
}
