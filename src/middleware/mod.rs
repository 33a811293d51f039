//! The project's own tower layers, the hasher of the maps they key by what clients send, and
//! the slots of recent values in front of the caches ([`recent`]). Layers tower and
//! tower-http provide are configured in `crate::stack` directly.

use std::hash::{BuildHasher, RandomState};
use std::sync::LazyLock;

use foldhash::SharedSeed;

pub mod backend_metrics;
pub mod breaker;
pub mod cache;
pub mod catch_panic;
pub mod compression;
pub mod conditional;
pub mod cors;
pub mod downloads;
pub mod load_shed;
pub mod metrics;
pub mod normalise;
pub mod preflight;
pub mod rate_limit;
pub mod recent;
pub mod request_id;
pub mod rescue;
pub mod timeout;
pub mod trace;

/// The hasher of the maps keyed by what clients send: the answer caches' keys, the rendered
/// answers' keys, the client addresses of the rate limit and the download share. foldhash:
/// SipHash, the standard library's, cost about 270 instructions a lookup on a cached GET's
/// keys, foldhash under half of that.
/// Its seed comes from the operating system's randomness (through the standard library's
/// `RandomState`), drawn once per process, not from foldhash's own, which mixes addresses and
/// the clock: a client cannot aim keys at one bucket without it. Nothing here shows a client
/// the hashes; the memo's first-ask slots, whose effect a client can time, keep SipHash.
#[derive(Clone, Debug)]
pub struct KeyHasher(foldhash::fast::SeedableRandomState);

impl Default for KeyHasher {
    fn default() -> Self {
        static SEED: LazyLock<SharedSeed> =
            LazyLock::new(|| SharedSeed::from_u64(RandomState::new().hash_one(0u64)));
        Self(foldhash::fast::SeedableRandomState::with_seed(
            RandomState::new().hash_one(0u64),
            &SEED,
        ))
    }
}

impl BuildHasher for KeyHasher {
    type Hasher = foldhash::fast::FoldHasher<'static>;

    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}
