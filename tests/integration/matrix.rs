//! The version matrix: the core behaviours on every PostgreSQL major besides
//! the default server's (Debian's 15, which runs the full suite): delivery in
//! commit order with headers, a SIGTERM restart repeating only unconfirmed
//! rows, a standby instance taking the slot over after a SIGKILL, restarts
//! sending nothing twice plus `replay`, the slot holding while the broker is
//! down (MockCluster), and the SIGKILL loop. Each is the suite's own test body
//! run against `servers_on(major)`: one server per major, started once per
//! test binary and shared by that major's tests; the broker is shared by all.
//! The binaries come from deploy/dev/install-deps.sh (npm builds in the cache).
//! Test names are the bodies' names: `matrix::pg17::slot_holds_while_the_broker_is_down`.

/// One test per body `module::body`, each on `servers_on(major)`.
macro_rules! on_server {
    ($major:literal: $($module:ident::$body:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $body() {
            crate::$module::$body(crate::harness::servers_on($major)).await;
        }
    )*};
}

macro_rules! on_versions {
    ($($major:literal => $version:ident),* $(,)?) => {$(
        mod $version {
            on_server!($major:
                delivery::every_row_once_in_commit_order_per_key_with_headers,
                shutdown::sigterm_then_restart_repeats_only_unconfirmed_rows,
                ha::standby_instance_takes_over_after_sigkill,
                replay::restarts_send_nothing_twice_and_replay_sends_the_range,
                mock_broker::slot_holds_while_the_broker_is_down,
                faults::sigkill_loop_loses_nothing_and_keeps_per_key_order,
            );
        }
    )*};
}

on_versions!(14 => pg14, 16 => pg16, 17 => pg17, 18 => pg18);
