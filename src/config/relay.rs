//! `[relay]` (reconnects, shutdown, standby) and `[metrics]` (the listener).

use serde::Deserialize;

use super::{invalid, ConfigError};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// How long shutdown waits for in-flight deliveries, in milliseconds. Default 10000.
    pub shutdown_timeout_ms: u64,
    /// First reconnect delay after a failure, in milliseconds (doubles, with jitter). Default 500.
    pub reconnect_backoff_min_ms: u64,
    /// Largest reconnect delay, in milliseconds. Default 30000.
    pub reconnect_backoff_max_ms: u64,
    /// While another instance streams from the slot, how often to try to take
    /// it over, in milliseconds (with jitter). Default 1000.
    pub standby_retry_ms: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            shutdown_timeout_ms: 10_000,
            reconnect_backoff_min_ms: 500,
            reconnect_backoff_max_ms: 30_000,
            standby_retry_ms: 1000,
        }
    }
}

impl RelayConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.reconnect_backoff_min_ms == 0
            || self.reconnect_backoff_min_ms > self.reconnect_backoff_max_ms
        {
            return Err(invalid(
                "relay.reconnect_backoff_min_ms",
                "must be at least 1 and not above relay.reconnect_backoff_max_ms",
            ));
        }
        if self.standby_retry_ms < 10 {
            return Err(invalid("relay.standby_retry_ms", "must be at least 10"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the `/metrics`, `/healthz` and `/readyz` listener. Default
    /// `127.0.0.1:9187` (loopback only); `0.0.0.0:9187` exposes it; "" disables it.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:9187".into(),
        }
    }
}

impl MetricsConfig {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.is_empty() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "metrics.listen",
                format!(
                    "{:?} is not an address like \"127.0.0.1:9187\" (use \"\" to disable)",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}
