//! `nimbus-buckets` owns the node's object storage: named buckets of
//! objects, written and read as streams, behind the [`BucketStore`] trait.
//!
//! Two stores implement it. [`LocalDisk`] is the embedded default: object
//! bodies are content-addressed files under the data directory, written to a
//! temporary file, fsync'd and renamed into place before a SQLite index
//! (WAL, `synchronous = FULL`) records them, so an acknowledged write
//! survives a crash and a half-written one never becomes visible.
//! [`S3Store`] keeps the objects in any S3-compatible service through the
//! `object_store` crate. What happens after a change (object events for the
//! functions that watch a bucket) is the node's business, not the store's.

mod local;
mod s3;

pub use local::LocalDisk;
pub use nimbus_manifest::BucketName;
pub use s3::S3Store;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use std::fmt;

/// A stream of body bytes, read or written.
pub type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

/// Longest object key, in bytes (S3's limit).
pub const MAX_KEY_BYTES: usize = 1024;

/// What a store knows about one object.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// An opaque tag that changes whenever the content does.
    pub etag: String,
    /// When the object was last written, ms since the Unix epoch.
    pub modified_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    /// The body went over the size limit; nothing was stored.
    #[error("the object is larger than the limit of {0} bytes")]
    TooLarge(u64),
    /// Reading the body from the client failed; nothing was stored.
    #[error("reading the object's body failed: {0}")]
    Body(std::io::Error),
    /// The store itself failed (disk, network, credentials).
    #[error("the object store failed: {0}")]
    Backend(String),
}

impl From<std::io::Error> for BucketError {
    fn from(e: std::io::Error) -> Self {
        Self::Backend(e.to_string())
    }
}

impl From<rusqlite::Error> for BucketError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Backend(e.to_string())
    }
}

/// A validated object key: 1 to 1,024 bytes of text without control
/// characters, `/`-separated parts that are neither empty nor `.` or `..`.
/// The same rules hold on every store, so an object can move between them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(String);

/// Why a key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid object key `{0}`: use 1 to 1024 bytes of text without control characters, with `/` between non-empty parts that are not `.` or `..` (e.g. `images/2024/cat.png`)"
)]
pub struct KeyError(String);

impl ObjectKey {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ObjectKey {
    type Err = KeyError;
    fn from_str(key: &str) -> Result<Self, KeyError> {
        let ok = !key.is_empty()
            && key.len() <= MAX_KEY_BYTES
            && !key.chars().any(char::is_control)
            && key
                .split('/')
                .all(|p| !p.is_empty() && p != "." && p != "..");
        if ok {
            Ok(Self(key.to_owned()))
        } else {
            let shown: String = key.chars().take(80).collect();
            Err(KeyError(shown.escape_debug().to_string()))
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A written object's body with what the store knows about it.
pub struct Object {
    pub info: ObjectInfo,
    pub body: ByteStream,
}

/// One page of a listing, in key order.
#[derive(Debug, serde::Serialize)]
pub struct Listing {
    pub objects: Vec<ObjectInfo>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_after: Option<String>,
}

/// Where buckets keep their objects. Every method is safe to call
/// concurrently; a write replaces the whole object atomically (readers see
/// the old or the new content, never a mix).
pub trait BucketStore: Send + Sync {
    /// Stores `body` as `key`, replacing any object there. Fails with
    /// [`BucketError::TooLarge`] past `max_bytes`, leaving the old object.
    fn put(
        &self,
        bucket: BucketName,
        key: ObjectKey,
        content_type: Option<String>,
        body: ByteStream,
        max_bytes: u64,
    ) -> BoxFuture<'_, Result<ObjectInfo, BucketError>>;

    /// The object's content, or `None` when there is no such object.
    fn get(
        &self,
        bucket: BucketName,
        key: ObjectKey,
    ) -> BoxFuture<'_, Result<Option<Object>, BucketError>>;

    /// What is known about the object, without its content.
    fn head(
        &self,
        bucket: BucketName,
        key: ObjectKey,
    ) -> BoxFuture<'_, Result<Option<ObjectInfo>, BucketError>>;

    /// Up to `limit` objects whose keys start with `prefix` and sort after
    /// `after`, in key order.
    fn list(
        &self,
        bucket: BucketName,
        prefix: String,
        after: Option<String>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Listing, BucketError>>;

    /// Deletes the object; answers what was deleted, or `None` when there
    /// was no such object.
    fn delete(
        &self,
        bucket: BucketName,
        key: ObjectKey,
    ) -> BoxFuture<'_, Result<Option<ObjectInfo>, BucketError>>;
}

/// Builds a page from up to `limit + 1` objects in key order.
fn page(mut objects: Vec<ObjectInfo>, limit: usize) -> Listing {
    let more = objects.len() > limit;
    objects.truncate(limit);
    let next_after = if more {
        objects.last().map(|o| o.key.clone())
    } else {
        None
    };
    Listing {
        objects,
        next_after,
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        for good in ["a", "images/2024/cat 1.png", "ünïcode/κλειδί", "a.b/..c"] {
            assert!(good.parse::<ObjectKey>().is_ok(), "{good}");
        }
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        for bad in [
            "", "/a", "a/", "a//b", "./a", "a/../b", "a\nb", "a\0", &long,
        ] {
            let e = bad.parse::<ObjectKey>().unwrap_err();
            assert!(e.to_string().contains("invalid object key"), "{bad}");
        }
    }

    #[test]
    fn pages_point_at_the_next() {
        let o = |k: &str| ObjectInfo {
            key: k.into(),
            size: 0,
            etag: String::new(),
            modified_ms: 0,
            content_type: None,
        };
        let p = page(vec![o("a"), o("b"), o("c")], 2);
        assert_eq!(p.objects.len(), 2);
        assert_eq!(p.next_after.as_deref(), Some("b"));
        assert_eq!(page(vec![o("a")], 2).next_after, None);
    }
}
