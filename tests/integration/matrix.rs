//! The version matrix: the core behaviours on every PostgreSQL major besides
//! the default server's (Debian's 15, which runs the full suite): delivery in
//! commit order with headers, a SIGTERM restart repeating only unconfirmed
//! rows, a standby instance taking the slot over after a SIGKILL, restarts
//! sending nothing twice plus `replay`, the slot holding while the broker is
//! down (MockCluster), and the SIGKILL loop. Each is the suite's own test body
//! run against `servers_on(major)`: one server per major, started once per
//! test binary and shared by that major's tests; the broker is shared by all.
//! The binaries come from deploy/dev/install-deps.sh (npm builds in the cache).

macro_rules! on_versions {
    ($($major:literal => $module:ident),* $(,)?) => {$(
        mod $module {
            use crate::harness::servers_on;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn delivery_once_in_commit_order_per_key_with_headers() {
                crate::delivery::every_row_once_in_commit_order_per_key_with_headers(servers_on($major)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sigterm_restart_repeats_only_unconfirmed_rows() {
                crate::shutdown::sigterm_then_restart_repeats_only_unconfirmed_rows(servers_on($major)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn standby_instance_takes_over_after_sigkill() {
                crate::ha::standby_instance_takes_over_after_sigkill(servers_on($major)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn restarts_send_nothing_twice_and_replay_sends_the_range() {
                crate::replay::restarts_send_nothing_twice_and_replay_sends_the_range(servers_on($major)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn slot_holds_while_the_broker_is_down() {
                crate::mock_broker::slot_holds_while_the_broker_is_down(servers_on($major)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sigkill_loop_loses_nothing_and_keeps_per_key_order() {
                crate::faults::sigkill_loop_loses_nothing_and_keeps_per_key_order(servers_on($major)).await;
            }
        }
    )*};
}

on_versions!(14 => pg14, 16 => pg16, 17 => pg17, 18 => pg18);
