//! What an error means, decided in one place: retried with backoff, standing
//! by (another instance streams from the slot), or stopping the relay with an
//! exit code. The run loop, `run`'s exit code and the admin commands all ask
//! [`RelayError::disposition`] or [`SetupError::disposition`]. Below it, each
//! boundary's own `is_permanent` still says whether its error is one the user
//! must fix (SQLSTATE classes, TLS refusals), and `transport::connect_any`
//! decides which errors move on to the next host of a multi-host URL.

use super::RelayError;
use crate::setup::poll::PollError;
use crate::setup::SetupError;
use crate::sink::{SendError, SinkSetupError};

/// Exit code when the user must change the configuration or the database
/// (credentials, privileges, TLS, a missing or lost slot, a too old server).
pub const EXIT_USER: u8 = 2;
/// Exit code when the relay stops at run time (a row it cannot relay, a
/// protocol error): the cause is named in the log.
pub const EXIT_RUNTIME: u8 = 1;

/// What the relay does after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Reconnect after a jittered exponential backoff.
    Retry,
    /// Another connection streams from the slot: stand by and try again every
    /// `relay.standby_retry_ms`.
    Standby,
    /// Stop; the process exits with `exit`.
    Stop { exit: u8 },
}

impl Disposition {
    /// The exit code when this error ends a command (a retried error that
    /// ends one, e.g. an unreachable server for `status`, is a runtime failure).
    pub fn exit_code(self) -> u8 {
        match self {
            Disposition::Stop { exit } => exit,
            Disposition::Retry | Disposition::Standby => EXIT_RUNTIME,
        }
    }
}

impl SetupError {
    pub fn disposition(&self) -> Disposition {
        if self.is_permanent() {
            Disposition::Stop { exit: EXIT_USER }
        } else {
            Disposition::Retry
        }
    }
}

impl PollError {
    pub fn disposition(&self) -> Disposition {
        match self {
            PollError::LockHeld { .. } => Disposition::Standby,
            PollError::BadRow { .. } => Disposition::Stop { exit: EXIT_RUNTIME },
            _ => Disposition::Stop { exit: EXIT_USER },
        }
    }
}

impl RelayError {
    pub fn disposition(&self) -> Disposition {
        use Disposition::{Retry, Standby, Stop};
        match self {
            RelayError::Replication(e) if e.is_slot_in_use() => Standby,
            RelayError::Replication(e) if e.is_permanent() => Stop { exit: EXIT_USER },
            RelayError::Replication(_) => Retry,
            RelayError::Setup(e) => e.disposition(),
            RelayError::Poll(e) => e.disposition(),
            RelayError::Sink(SinkSetupError::Config { .. }) => Stop { exit: EXIT_USER },
            RelayError::Sink(
                SinkSetupError::Connect { .. } | SinkSetupError::CreateTopic { .. },
            ) => Retry,
            RelayError::Delivery(_) | RelayError::Send(SendError::Unavailable { .. }) => Retry,
            RelayError::StartBehindSlot { .. } | RelayError::CheckpointAhead { .. } => {
                Stop { exit: EXIT_USER }
            }
            RelayError::Decode { .. }
            | RelayError::Mapping(_)
            | RelayError::Send(_)
            | RelayError::UnknownRelation(_)
            | RelayError::Refused { .. } => Stop { exit: EXIT_RUNTIME },
        }
    }

    /// The relay stops on this error (the user, or a bad row, has to be dealt with).
    pub fn is_fatal(&self) -> bool {
        matches!(self.disposition(), Disposition::Stop { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::Disposition::{Retry, Standby, Stop};
    use super::*;
    use crate::lsn::Lsn;
    use crate::outbox::MappingError;
    use crate::pgoutput::DecodeError;
    use crate::replication::ReplicationError;
    use crate::sink::DeliveryError;
    use crate::transport::ConnectError;

    fn server(code: &str, detail: Option<&str>) -> ReplicationError {
        ReplicationError::Server {
            severity: "ERROR".into(),
            code: code.into(),
            message: "m".into(),
            detail: detail.map(Into::into),
            hint: None,
        }
    }

    fn setup(e: SetupError) -> RelayError {
        RelayError::Setup(Box::new(e))
    }

    #[test]
    fn every_kind_of_error_has_one_disposition() {
        let user = Stop { exit: EXIT_USER };
        let runtime = Stop { exit: EXIT_RUNTIME };
        let io = || std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let table: Vec<(&str, RelayError, Disposition)> = vec![
            (
                "slot in use",
                RelayError::Replication(server("55006", None)),
                Standby,
            ),
            (
                "bad password",
                RelayError::Replication(server("28P01", None)),
                user,
            ),
            (
                "no such database",
                RelayError::Replication(server("3D000", None)),
                user,
            ),
            (
                "invalidated slot",
                RelayError::Replication(server("55000", None)),
                user,
            ),
            (
                "synced slot on a standby",
                RelayError::Replication(server(
                    "55000",
                    Some("This replication slot is being synchronized from the primary server."),
                )),
                Retry,
            ),
            (
                "server shutting down",
                RelayError::Replication(server("57P01", None)),
                Retry,
            ),
            (
                "slot not on the streaming host",
                RelayError::Replication(ReplicationError::NoSlotHere { slot: "s".into() }),
                Retry,
            ),
            (
                "closed",
                RelayError::Replication(ReplicationError::Closed {
                    context: "streaming",
                }),
                Retry,
            ),
            (
                "reset",
                RelayError::Replication(ReplicationError::Io {
                    context: "streaming",
                    source: io(),
                }),
                Retry,
            ),
            (
                "auth",
                RelayError::Replication(ReplicationError::Auth {
                    user: "u".into(),
                    message: "m".into(),
                }),
                user,
            ),
            (
                "no primary among the hosts",
                setup(SetupError::Transport(ConnectError::NoSuitableHost {
                    wanted: "read-write",
                    tried: vec!["a is a standby".into()],
                })),
                Retry,
            ),
            (
                "certificate",
                setup(SetupError::Transport(ConnectError::CertVerify {
                    target: "t".into(),
                    reason: "r".into(),
                    root: crate::transport::RootCert::System,
                })),
                user,
            ),
            (
                "wal_level",
                setup(SetupError::WalLevel {
                    actual: "replica".into(),
                }),
                user,
            ),
            (
                "too old",
                setup(SetupError::TooOld {
                    version_num: 130000,
                }),
                user,
            ),
            (
                "synced slot",
                setup(SetupError::SlotSynced { name: "s".into() }),
                Retry,
            ),
            (
                "slot missing",
                setup(SetupError::SlotMissing {
                    name: "s".into(),
                    at_risk: None,
                }),
                user,
            ),
            (
                "no hot_standby_feedback",
                setup(SetupError::NoHotStandbyFeedback),
                user,
            ),
            (
                "sink config",
                RelayError::Sink(SinkSetupError::Config {
                    sink: "Kafka",
                    message: "x".into(),
                }),
                user,
            ),
            (
                "sink unreachable at start",
                RelayError::Sink(SinkSetupError::Connect {
                    sink: "Redis",
                    error: "refused".into(),
                }),
                Retry,
            ),
            (
                "topic creation",
                RelayError::Sink(SinkSetupError::CreateTopic {
                    topic: "t".into(),
                    error: "e".into(),
                }),
                Retry,
            ),
            (
                "delivery timed out",
                RelayError::Delivery(DeliveryError {
                    sink: "Kafka",
                    topic: "t".into(),
                    error: "Message production error: MessageTimedOut".into(),
                    refused: None,
                }),
                Retry,
            ),
            (
                "sink connection lost",
                RelayError::Send(SendError::Unavailable {
                    sink: "NATS",
                    error: "closed".into(),
                }),
                Retry,
            ),
            (
                "client refuses to enqueue",
                RelayError::Send(SendError::Failed {
                    topic: "t".into(),
                    error: "e".into(),
                }),
                runtime,
            ),
            (
                "decode",
                RelayError::Decode {
                    lsn: Lsn(1),
                    source: DecodeError::UnknownTag { tag: 'x' },
                },
                runtime,
            ),
            (
                "bad row",
                RelayError::Mapping(MappingError::MissingColumn {
                    table: "t".into(),
                    column: "c".into(),
                    available: "a".into(),
                    setting: "s".into(),
                }),
                runtime,
            ),
            (
                "stdout closed",
                RelayError::Send(SendError::Output(io())),
                runtime,
            ),
            ("unknown relation", RelayError::UnknownRelation(7), runtime),
            (
                "refused record",
                RelayError::Refused {
                    sink: "Kafka",
                    topic: "t".into(),
                    id: "i".into(),
                    lsn: "0/1".into(),
                    error: "e".into(),
                },
                runtime,
            ),
            (
                "start behind the slot",
                RelayError::StartBehindSlot {
                    slot: "s".into(),
                    start: Lsn(1),
                    confirmed: Lsn(2),
                },
                user,
            ),
            (
                "another instance polls the table",
                RelayError::from(crate::setup::poll::PollError::LockHeld {
                    table: crate::config::TableName {
                        schema: "public".into(),
                        name: "outbox".into(),
                    },
                    pid: Some(7),
                }),
                Standby,
            ),
            (
                "polling a standby",
                RelayError::from(crate::setup::poll::PollError::NotPrimary),
                user,
            ),
            (
                "a polled row that cannot be mapped",
                RelayError::from(crate::setup::poll::PollError::BadRow {
                    column: "relay_seq".into(),
                    value: 3,
                    source: MappingError::MissingColumn {
                        table: "t".into(),
                        column: "c".into(),
                        available: "a".into(),
                        setting: "s".into(),
                    },
                }),
                runtime,
            ),
            (
                "checkpoint from another cluster",
                RelayError::CheckpointAhead {
                    slot: "s".into(),
                    schema: "o".into(),
                    checkpoint: Lsn(2),
                    current: Lsn(1),
                },
                user,
            ),
        ];
        for (what, err, want) in table {
            assert_eq!(err.disposition(), want, "{what}: {err}");
            assert_eq!(err.is_fatal(), matches!(want, Stop { .. }), "{what}");
        }
        assert_eq!(Retry.exit_code(), EXIT_RUNTIME);
        assert_eq!(user.exit_code(), EXIT_USER);
    }
}
