//! The process's open-file limit, and the connection cap that fits under it.
//!
//! Every client connection holds a descriptor, and so do the backends' connections, the
//! local backend's files and the runtime itself. Under a soft limit of 1,024 (systemd's and
//! most shells' default) the default `max_connections` of 10,000 is never reached: idle
//! sockets exhaust the descriptors first, accepting fails and the backends cannot open their
//! files. So the soft limit is raised to the hard one at start, as servers commonly do, and
//! the connection cap is held to what the limit leaves after a reserve for everything else:
//! a quarter of the limit, or a descriptor for each download that may stream and
//! [`RESERVED_AT_LEAST`] more, whichever is larger; a cap lowered that way is logged.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept out of the connection cap beside the downloads' own: backend calls and
/// their pools, metadata files, the listener and the runtime.
pub const RESERVED_AT_LEAST: u64 = 64;

/// What a soft limit is raised to when the hard one is unlimited, which Linux never has (its
/// hard limit is at most `fs.nr_open`, by default this); elsewhere `setrlimit` may refuse it.
const UNLIMITED_AS: u64 = 1 << 20;

/// Raises the soft open-file limit to the hard one; left as it is when it cannot be.
pub fn raise_open_file_limit() {
    let limit = getrlimit(Resource::Nofile);
    let wanted = limit.maximum.unwrap_or(UNLIMITED_AS);
    let Some(soft) = limit.current.filter(|&soft| soft < wanted) else {
        return;
    };
    let raised = Rlimit {
        current: Some(wanted),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::info!(from = soft, to = wanted, "open-file limit raised"),
        Err(e) => tracing::warn!(error = %e, soft, "open-file limit left as it is"),
    }
}

/// The soft open-file limit now; `None` when unlimited.
pub fn open_file_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// How many connections may be open at once: `max_connections`, or fewer when the soft
/// open-file `limit` leaves room for fewer after its reserve (see the module documentation)
/// for `downloads` streaming at once.
pub fn connection_cap(max_connections: usize, downloads: usize, limit: Option<u64>) -> usize {
    let Some(limit) = limit else {
        return max_connections;
    };
    let downloads = u64::try_from(downloads).unwrap_or(u64::MAX);
    let reserved = (limit / 4).max(downloads.saturating_add(RESERVED_AT_LEAST));
    let room = usize::try_from(limit.saturating_sub(reserved))
        .unwrap_or(usize::MAX)
        .max(1);
    max_connections.min(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_a_quarter_of_the_limit_or_room_for_the_downloads() {
        assert_eq!(connection_cap(10_000, 256, None), 10_000);
        assert_eq!(connection_cap(10_000, 256, Some(1 << 20)), 10_000);
        assert_eq!(connection_cap(10_000, 256, Some(4096)), 3072);
        assert_eq!(connection_cap(10_000, 256, Some(1024)), 704);
        assert_eq!(connection_cap(10_000, 16, Some(1024)), 768);
        assert_eq!(connection_cap(100, 256, Some(1024)), 100);
        assert_eq!(connection_cap(10_000, 16, Some(200)), 120);
        assert_eq!(connection_cap(10_000, 256, Some(256)), 1);
    }
}
