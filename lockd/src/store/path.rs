//! Path validation. Paths are absolute, '/'-separated, with no empty, "." or
//! ".." segments and no trailing slash (except the root "/").
//!
//! The API layer checks paths against the configured size limits before a
//! request is proposed; the state machine re-checks the shape (never the
//! limits, which are member configuration and must not affect apply).

use thiserror::Error;

/// Size limits enforced on requests before they reach Raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest accepted path, in bytes.
    pub max_key_bytes: usize,
    /// Largest accepted node value, in bytes.
    pub max_value_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 4096,
            max_value_bytes: 1024 * 1024,
        }
    }
}

/// Why a path or value was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PathError {
    /// The path is empty.
    #[error("path is empty; paths are absolute, like /app/config")]
    Empty,
    /// The path does not start with '/'.
    #[error("path {0:?} is not absolute: it must start with '/'")]
    NotAbsolute(String),
    /// The path ends with '/'.
    #[error("path {0:?} has a trailing slash")]
    TrailingSlash(String),
    /// Two slashes in a row.
    #[error("path {0:?} has an empty segment ('//')")]
    EmptySegment(String),
    /// A "." or ".." segment.
    #[error("path {0:?} has a relative segment ('.' or '..')")]
    RelativeSegment(String),
    /// A NUL character.
    #[error("path {0:?} contains a NUL character")]
    Nul(String),
    /// Longer than the key limit.
    #[error("key is {len} bytes, over the limit of {limit} bytes (--max-key-bytes)")]
    KeyTooLong {
        /// Length of the refused key.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
    /// Larger than the value limit.
    #[error("value is {len} bytes, over the limit of {limit} bytes (--max-value-bytes)")]
    ValueTooLarge {
        /// Length of the refused value.
        len: usize,
        /// The configured limit.
        limit: usize,
    },
}

/// Checks the shape of a path (no size limit).
pub fn validate_shape(path: &str) -> Result<(), PathError> {
    if path.is_empty() {
        return Err(PathError::Empty);
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute(path.to_string()));
    }
    if path == "/" {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err(PathError::TrailingSlash(path.to_string()));
    }
    if path.contains('\0') {
        return Err(PathError::Nul(path.to_string()));
    }
    for seg in path[1..].split('/') {
        match seg {
            "" => return Err(PathError::EmptySegment(path.to_string())),
            "." | ".." => return Err(PathError::RelativeSegment(path.to_string())),
            _ => {}
        }
    }
    Ok(())
}

/// Checks a path's shape and length against `limits`.
pub fn validate_key(path: &str, limits: &Limits) -> Result<(), PathError> {
    if path.len() > limits.max_key_bytes {
        return Err(PathError::KeyTooLong {
            len: path.len(),
            limit: limits.max_key_bytes,
        });
    }
    validate_shape(path)
}

/// Checks a value's size against `limits`.
pub fn validate_value(value: &[u8], limits: &Limits) -> Result<(), PathError> {
    if value.len() > limits.max_value_bytes {
        return Err(PathError::ValueTooLarge {
            len: value.len(),
            limit: limits.max_value_bytes,
        });
    }
    Ok(())
}

/// The parent of a valid, non-root path.
pub fn parent(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

/// The last segment of a valid, non-root path.
pub fn name(path: &str) -> &str {
    match path.rfind('/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

/// Joins a directory path and a child name.
pub fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_well_formed_paths() {
        for p in ["/", "/a", "/a/b", "/locks/build/lock-0000000001", "/a b/ü"] {
            assert_eq!(validate_shape(p), Ok(()), "{p}");
        }
    }

    #[test]
    fn rejects_malformed_paths_with_the_reason() {
        assert_eq!(validate_shape(""), Err(PathError::Empty));
        assert!(matches!(
            validate_shape("a"),
            Err(PathError::NotAbsolute(_))
        ));
        assert!(matches!(
            validate_shape("/a/"),
            Err(PathError::TrailingSlash(_))
        ));
        assert!(matches!(
            validate_shape("/a//b"),
            Err(PathError::EmptySegment(_))
        ));
        assert!(matches!(
            validate_shape("/a/../b"),
            Err(PathError::RelativeSegment(_))
        ));
        assert!(matches!(
            validate_shape("/a/./b"),
            Err(PathError::RelativeSegment(_))
        ));
        assert!(matches!(validate_shape("/a\0"), Err(PathError::Nul(_))));
    }

    #[test]
    fn enforces_limits_and_names_them() {
        let limits = Limits {
            max_key_bytes: 8,
            max_value_bytes: 4,
        };
        assert_eq!(validate_key("/abcdefg", &limits), Ok(()));
        let err = validate_key("/abcdefgh", &limits).unwrap_err();
        assert_eq!(err, PathError::KeyTooLong { len: 9, limit: 8 });
        assert!(err.to_string().contains("limit of 8 bytes"));
        assert_eq!(validate_value(b"1234", &limits), Ok(()));
        let err = validate_value(b"12345", &limits).unwrap_err();
        assert!(err.to_string().contains("value is 5 bytes"));
    }

    #[test]
    fn parent_name_join() {
        assert_eq!(parent("/"), None);
        assert_eq!(parent("/a"), Some("/"));
        assert_eq!(parent("/a/b"), Some("/a"));
        assert_eq!(name("/a/b"), "b");
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/a", "b"), "/a/b");
    }
}
