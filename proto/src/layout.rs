//! The node layout shared by every lock-like recipe: the Rust client's
//! recipes (`lockd_client::recipes`) and the server's `Lock` and `Election`
//! services follow it, so a lock taken through one blocks the other.
//!
//! A lock (or election, semaphore, ...) is a *container* directory such as
//! `/locks/build`. Each contender is an ephemeral-sequential child named
//! `PREFIX` plus the directory's sequence number, zero-padded to ten digits
//! (`/locks/build/lock-0000000042`), owned by the contender's session.
//! Children whose name is not one of the recipe's prefixes followed by
//! digits are ignored. Contenders are ordered by sequence number; the lowest
//! holds a mutex or leads an election. A contender's fencing token is its
//! node's `create_revision`.

/// Contender of a mutex (client `Mutex`, server `Lock`).
pub const LOCK_PREFIX: &str = "lock-";
/// Candidate of an election (client `LeaderElection`, server `Election`);
/// the node's data is the candidate's identity (or proclaimed value).
pub const CANDIDATE_PREFIX: &str = "candidate-";
/// Reader of a read-write lock.
pub const READ_PREFIX: &str = "read-";
/// Writer of a read-write lock.
pub const WRITE_PREFIX: &str = "write-";
/// Holder or waiter of a semaphore permit.
pub const PERMIT_PREFIX: &str = "permit-";
/// Member of a double barrier.
pub const MEMBER_PREFIX: &str = "member-";
/// The node whose creation releases a double barrier's `enter`.
pub const READY_NODE: &str = "ready";

/// `dir` without trailing slashes (the root stays `/`).
pub fn trim_dir(dir: &str) -> &str {
    let mut d = dir;
    while d.len() > 1 && d.ends_with('/') {
        d = &d[..d.len() - 1];
    }
    d
}

/// The path prefix of a recipe's children: `DIR/PREFIX`.
pub fn child_prefix(dir: &str, prefix: &str) -> String {
    let dir = trim_dir(dir);
    if dir == "/" {
        format!("/{prefix}")
    } else {
        format!("{dir}/{prefix}")
    }
}

/// The sequence number of `path` if it is `child_prefix` followed by
/// digits only (`/locks/a/lock-0000000042` with prefix `/locks/a/lock-`
/// gives 42).
pub fn seq_of(child_prefix: &str, path: &str) -> Option<u64> {
    let digits = path.strip_prefix(child_prefix)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The items whose path (given by `path_of`) is a contender under
/// `child_prefix`, with their sequence numbers, lowest first.
pub fn contenders<T>(
    child_prefix: &str,
    items: impl IntoIterator<Item = T>,
    path_of: impl Fn(&T) -> &str,
) -> Vec<(u64, T)> {
    let mut v: Vec<(u64, T)> = items
        .into_iter()
        .filter_map(|t| Some((seq_of(child_prefix, path_of(&t))?, t)))
        .collect();
    v.sort_by_key(|(s, _)| *s);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_parse_only_for_the_prefix() {
        let p = child_prefix("/locks/a/", LOCK_PREFIX);
        assert_eq!(p, "/locks/a/lock-");
        assert_eq!(seq_of(&p, "/locks/a/lock-0000000042"), Some(42));
        assert_eq!(seq_of(&p, "/locks/a/lock-"), None);
        assert_eq!(seq_of(&p, "/locks/a/lock-00x"), None);
        assert_eq!(seq_of(&p, "/locks/a/candidate-0000000001"), None);
        assert_eq!(child_prefix("/", LOCK_PREFIX), "/lock-");
    }

    #[test]
    fn contenders_sort_by_sequence_and_skip_strangers() {
        let paths = [
            "/l/lock-0000000010",
            "/l/other",
            "/l/lock-0000000002",
            "/l/lock-0000000101",
        ];
        let c = contenders("/l/lock-", paths, |p| p);
        let seqs: Vec<u64> = c.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, vec![2, 10, 101]);
    }
}
