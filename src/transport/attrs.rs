//! `target_session_attrs`: which server of a multi-host URL the relay may use,
//! decided from what the server reports at connection start.

use std::str::FromStr;

/// libpq's `target_session_attrs`: which kind of server a connection must
/// reach. With several hosts (`host=a,b`), each is tried in turn and the first
/// of the right kind is kept: after a failover the relay follows the new primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionAttrs {
    /// Any server (the default).
    #[default]
    Any,
    /// Not in hot standby and not `default_transaction_read_only`.
    ReadWrite,
    /// In hot standby, or `default_transaction_read_only`.
    ReadOnly,
    /// Not in hot standby.
    Primary,
    /// In hot standby.
    Standby,
    /// A standby if one of the hosts is one, else any server.
    PreferStandby,
}

impl SessionAttrs {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionAttrs::Any => "any",
            SessionAttrs::ReadWrite => "read-write",
            SessionAttrs::ReadOnly => "read-only",
            SessionAttrs::Primary => "primary",
            SessionAttrs::Standby => "standby",
            SessionAttrs::PreferStandby => "prefer-standby",
        }
    }

    /// Whether a server in this state is acceptable (for `PreferStandby`: at all).
    pub fn accepts(self, server: ServerState) -> bool {
        match self {
            SessionAttrs::Any | SessionAttrs::PreferStandby => true,
            SessionAttrs::ReadWrite => !server.hot_standby && !server.read_only,
            SessionAttrs::ReadOnly => server.hot_standby || server.read_only,
            SessionAttrs::Primary => !server.hot_standby,
            SessionAttrs::Standby => server.hot_standby,
        }
    }
}

impl FromStr for SessionAttrs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "any" => SessionAttrs::Any,
            "read-write" => SessionAttrs::ReadWrite,
            "read-only" => SessionAttrs::ReadOnly,
            "primary" => SessionAttrs::Primary,
            "standby" => SessionAttrs::Standby,
            "prefer-standby" => SessionAttrs::PreferStandby,
            other => return Err(format!("target_session_attrs={other:?} is not one of any, read-write, read-only, primary, standby, prefer-standby")),
        })
    }
}

/// What a server said about itself at startup (`ParameterStatus`, reported by
/// PostgreSQL 14 and later on both kinds of connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServerState {
    /// `in_hot_standby = on`: a standby in recovery.
    pub hot_standby: bool,
    /// `default_transaction_read_only = on`.
    pub read_only: bool,
}

impl ServerState {
    /// From the `ParameterStatus` values (`None` when the server did not report one).
    pub fn from_parameters(in_hot_standby: Option<&str>, read_only: Option<&str>) -> ServerState {
        ServerState {
            hot_standby: in_hot_standby == Some("on"),
            read_only: read_only == Some("on"),
        }
    }

    pub(super) fn describe(self) -> &'static str {
        match (self.hot_standby, self.read_only) {
            (true, _) => "a standby (in_hot_standby = on)",
            (false, true) => "read-only (default_transaction_read_only = on)",
            (false, false) => "a read-write primary",
        }
    }
}
