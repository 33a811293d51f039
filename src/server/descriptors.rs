//! The process's open-file limit, and the connection cap that fits under it.
//!
//! Every client connection holds a descriptor, and so do the backends' connections, the
//! local backend's files and the runtime itself. Under a soft limit of 1,024 (systemd's and
//! most shells' default) the default `max_connections` of 10,000 is never reached: idle
//! sockets exhaust the descriptors first, accepting fails and the backends cannot open their
//! files. So the soft limit is raised to the hard one at start, as servers commonly do, and
//! the connection cap is held to what the limit leaves after a quarter of it (at least
//! [`RESERVED_AT_LEAST`]) kept for everything else; a cap lowered that way is logged.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept out of the connection cap, at least: backends, files, the runtime.
pub const RESERVED_AT_LEAST: u64 = 64;

/// The most a soft limit is raised to when the hard one is unlimited: Linux's default
/// `fs.nr_open`, above which `setrlimit` fails.
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
        Err(e) => tracing::debug!(error = %e, soft, "open-file limit left as it is"),
    }
}

/// The soft open-file limit now; `None` when unlimited.
pub fn open_file_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// How many connections may be open at once: `max_connections`, or fewer when the soft
/// open-file `limit` leaves room for fewer after its reserve.
pub fn connection_cap(max_connections: usize, limit: Option<u64>) -> usize {
    let Some(limit) = limit else {
        return max_connections;
    };
    let reserved = (limit / 4).max(RESERVED_AT_LEAST);
    let room = usize::try_from(limit.saturating_sub(reserved))
        .unwrap_or(usize::MAX)
        .max(1);
    max_connections.min(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_a_quarter_of_the_limit_and_at_least_the_reserve() {
        assert_eq!(connection_cap(10_000, None), 10_000);
        assert_eq!(connection_cap(10_000, Some(1 << 20)), 10_000);
        assert_eq!(connection_cap(10_000, Some(1024)), 768);
        assert_eq!(connection_cap(100, Some(1024)), 100);
        assert_eq!(connection_cap(10_000, Some(200)), 136);
        assert_eq!(connection_cap(10_000, Some(64)), 1);
    }
}
