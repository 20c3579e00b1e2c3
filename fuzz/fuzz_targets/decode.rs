//! Fuzz target: the pgoutput decoder and the CopyData and frame parsers never
//! panic, and a decoded message consumes exactly its bytes.
//!
//! The bounded run in CI is the proptest in `tests/decoder_props.rs`; this is
//! for longer local runs (needs a nightly toolchain and `cargo install cargo-fuzz`):
//!
//! ```sh
//! fuzz/seed.sh    # real PostgreSQL messages as the starting corpus
//! cargo +nightly fuzz run decode -- -max_total_time=600
//! ```
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use outbox_relay::pgoutput::{decode, DecodeError};
use outbox_relay::replication::{parse_copy_data, split_frame};

fuzz_target!(|data: &[u8]| {
    if decode(Bytes::copy_from_slice(data)).is_ok() {
        let mut longer = data.to_vec();
        longer.push(0);
        assert!(matches!(
            decode(Bytes::from(longer)),
            Err(DecodeError::Trailing { extra: 1, .. })
        ));
    }
    let _ = parse_copy_data(Bytes::copy_from_slice(data));
    let mut buf = BytesMut::from(data);
    while let Ok(Some((_, body))) = split_frame(&mut buf) {
        assert!(body.len() + 5 <= data.len());
    }
});
