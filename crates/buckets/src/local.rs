//! The embedded object store: content-addressed files on local disk, with a
//! SQLite index of keys.
//!
//! Layout under the store's directory: `index.db` (one row per object:
//! bucket, key, size, SHA-256, time, content type), `blobs/ab/<sha256>` (the
//! bodies; objects with the same content share one file) and `tmp/` (bodies
//! being received). A write streams into `tmp/`, hashing as it goes, fsyncs
//! the file, renames it to its digest, fsyncs the directory and only then
//! commits the index row; a crash at any point leaves either the old object
//! or the new one. Changes to the index and to the set of blobs take one
//! lock, so a delete never removes a blob that a concurrent write is about
//! to point at.

use crate::{
    BucketError, BucketName, BucketStore, ByteStream, Listing, Object, ObjectInfo, ObjectKey,
    now_ms, page,
};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{StreamExt as _, TryStreamExt as _};
use rusqlite::{Connection, OptionalExtension as _, params};
use sha2::{Digest as _, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Size of the chunks a read is streamed in.
const READ_CHUNK: usize = 64 << 10;

/// Objects on local disk under one directory.
#[derive(Clone)]
pub struct LocalDisk {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    index: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS objects (
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    modified INTEGER NOT NULL,
    content_type TEXT,
    PRIMARY KEY (bucket, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS objects_by_blob ON objects (sha256);
";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ObjectInfo> {
    Ok(ObjectInfo {
        key: r.get(0)?,
        size: r.get::<_, i64>(1)? as u64,
        etag: r.get(2)?,
        modified_ms: r.get(3)?,
        content_type: r.get(4)?,
    })
}

impl LocalDisk {
    /// Opens (creating) the store in `dir`. Leftovers of a crash, bodies
    /// half received and blobs no object points at, are removed.
    pub fn open(dir: &Path) -> Result<Self, BucketError> {
        for sub in ["blobs", "tmp"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        for entry in std::fs::read_dir(dir.join("tmp"))? {
            let _ = std::fs::remove_file(entry?.path());
        }
        let conn = Connection::open(dir.join("index.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(SCHEMA)?;
        let store = Self {
            inner: Arc::new(Inner {
                dir: dir.to_owned(),
                index: Mutex::new(conn),
            }),
        };
        let removed = store.inner.collect_garbage()?;
        if removed > 0 {
            tracing::info!(removed, "removed object bodies that no object points at");
        }
        Ok(store)
    }
}

impl Inner {
    fn blob_path(&self, sha: &str) -> PathBuf {
        // The index only holds SHA-256 hex digests; a damaged row still
        // gets a path rather than a panic.
        let shard = sha.get(..2).unwrap_or("__");
        self.dir.join("blobs").join(shard).join(sha)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Connection>, BucketError> {
        self.index
            .lock()
            .map_err(|_| BucketError::Backend("the object index lock was poisoned".into()))
    }

    /// Removes blobs that no index row names (left by a crash between a
    /// row's removal and its blob's).
    fn collect_garbage(&self) -> Result<usize, BucketError> {
        let conn = self.lock()?;
        let mut removed = 0;
        for shard in std::fs::read_dir(self.dir.join("blobs"))? {
            let shard = shard?.path();
            if !shard.is_dir() {
                continue;
            }
            for blob in std::fs::read_dir(&shard)? {
                let blob = blob?.path();
                let Some(sha) = blob.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                if !referenced(&conn, sha)? {
                    std::fs::remove_file(&blob)?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// Moves a received body into place and records it, under the lock.
    fn commit(
        &self,
        bucket: &str,
        tmp: &Path,
        info: &ObjectInfo,
    ) -> Result<Option<String>, BucketError> {
        let conn = self.lock()?;
        let blob = self.blob_path(&info.etag);
        let shard = blob.parent().unwrap_or(&self.dir).to_owned();
        std::fs::create_dir_all(&shard)?;
        if blob.exists() {
            // The same content is stored already.
            std::fs::remove_file(tmp)?;
        } else {
            std::fs::rename(tmp, &blob)?;
            std::fs::File::open(&shard)?.sync_all()?;
        }
        let previous: Option<String> = conn
            .query_row(
                "SELECT sha256 FROM objects WHERE bucket = ?1 AND key = ?2",
                params![bucket, info.key],
                |r| r.get(0),
            )
            .optional()?;
        conn.execute(
            "INSERT INTO objects (bucket, key, size, sha256, modified, content_type)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (bucket, key) DO UPDATE SET size = excluded.size,
               sha256 = excluded.sha256, modified = excluded.modified,
               content_type = excluded.content_type",
            params![
                bucket,
                info.key,
                info.size as i64,
                info.etag,
                info.modified_ms,
                info.content_type
            ],
        )?;
        self.release(&conn, previous.filter(|p| *p != info.etag))
    }

    /// Removes the blob `sha` when no object points at it any more; returns
    /// its digest if it was removed.
    fn release(
        &self,
        conn: &Connection,
        sha: Option<String>,
    ) -> Result<Option<String>, BucketError> {
        match sha {
            Some(sha) if !referenced(conn, &sha)? => {
                match std::fs::remove_file(self.blob_path(&sha)) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
                Ok(Some(sha))
            }
            _ => Ok(None),
        }
    }

    fn head(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>, BucketError> {
        let conn = self.lock()?;
        Ok(conn
            .query_row(
                "SELECT key, size, sha256, modified, content_type FROM objects
                 WHERE bucket = ?1 AND key = ?2",
                params![bucket, key],
                row,
            )
            .optional()?)
    }

    fn delete(&self, bucket: &str, key: &str) -> Result<Option<ObjectInfo>, BucketError> {
        let conn = self.lock()?;
        let Some(info) = conn
            .query_row(
                "DELETE FROM objects WHERE bucket = ?1 AND key = ?2
                 RETURNING key, size, sha256, modified, content_type",
                params![bucket, key],
                row,
            )
            .optional()?
        else {
            return Ok(None);
        };
        self.release(&conn, Some(info.etag.clone()))?;
        Ok(Some(info))
    }

    fn list(
        &self,
        bucket: &str,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Listing, BucketError> {
        let conn = self.lock()?;
        let mut stmt = conn.prepare_cached(
            "SELECT key, size, sha256, modified, content_type FROM objects
             WHERE bucket = ?1 AND key >= ?2 AND substr(key, 1, length(?2)) = ?2
               AND (?3 IS NULL OR key > ?3)
             ORDER BY key LIMIT ?4",
        )?;
        let objects = stmt
            .query_map(params![bucket, prefix, after, limit as i64 + 1], row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(page(objects, limit))
    }
}

fn referenced(conn: &Connection, sha: &str) -> Result<bool, BucketError> {
    Ok(conn
        .query_row(
            "SELECT 1 FROM objects WHERE sha256 = ?1 LIMIT 1",
            params![sha],
            |_| Ok(()),
        )
        .optional()?
        .is_some())
}

/// Runs index work off the async threads.
async fn blocking<T: Send + 'static>(
    inner: &Arc<Inner>,
    f: impl FnOnce(&Inner) -> Result<T, BucketError> + Send + 'static,
) -> Result<T, BucketError> {
    let inner = inner.clone();
    tokio::task::spawn_blocking(move || f(&inner))
        .await
        .map_err(|e| BucketError::Backend(format!("an index task failed: {e}")))?
}

/// A fresh name for a body being received.
fn tmp_name() -> String {
    let mut bytes = [0u8; 12];
    let _ = getrandom::fill(&mut bytes);
    hex::encode(bytes)
}

/// Streams `body` into `path`, hashing it; fails past `max_bytes`.
async fn receive(
    path: &Path,
    mut body: ByteStream,
    max_bytes: u64,
) -> Result<(u64, String), BucketError> {
    let mut file = tokio::fs::File::create(path).await?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(BucketError::Body)?;
        size += chunk.len() as u64;
        if size > max_bytes {
            return Err(BucketError::TooLarge(max_bytes));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await?;
    }
    file.sync_all().await?;
    Ok((size, hex::encode(hasher.finalize())))
}

impl BucketStore for LocalDisk {
    fn put(
        &self,
        bucket: BucketName,
        key: ObjectKey,
        content_type: Option<String>,
        body: ByteStream,
        max_bytes: u64,
    ) -> BoxFuture<'_, Result<ObjectInfo, BucketError>> {
        Box::pin(async move {
            let tmp = self.inner.dir.join("tmp").join(tmp_name());
            let (size, sha) = match receive(&tmp, body, max_bytes).await {
                Ok(r) => r,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&tmp).await;
                    return Err(e);
                }
            };
            let info = ObjectInfo {
                key: key.as_str().to_owned(),
                size,
                etag: sha,
                modified_ms: now_ms(),
                content_type,
            };
            let committed = info.clone();
            let received = tmp.clone();
            let result = blocking(&self.inner, move |inner| {
                inner.commit(bucket.as_str(), &received, &committed)
            })
            .await;
            if result.is_err() {
                let _ = tokio::fs::remove_file(&tmp).await;
            }
            result.map(|_| info)
        })
    }

    fn get(
        &self,
        bucket: BucketName,
        key: ObjectKey,
    ) -> BoxFuture<'_, Result<Option<Object>, BucketError>> {
        Box::pin(async move {
            // The blob is opened under the lock, so a concurrent delete or
            // replacement cannot remove it in between; once open, the file
            // stays readable until closed.
            let opened = blocking(&self.inner, move |inner| {
                let conn = inner.lock()?;
                let info = conn
                    .query_row(
                        "SELECT key, size, sha256, modified, content_type FROM objects
                         WHERE bucket = ?1 AND key = ?2",
                        params![bucket.as_str(), key.as_str()],
                        row,
                    )
                    .optional()?;
                match info {
                    None => Ok(None),
                    Some(info) => {
                        let file = std::fs::File::open(inner.blob_path(&info.etag))?;
                        Ok(Some((info, file)))
                    }
                }
            })
            .await?;
            Ok(opened.map(|(info, file)| Object {
                info,
                body: read_stream(tokio::fs::File::from_std(file)),
            }))
        })
    }

    fn head(
        &self,
        bucket: BucketName,
        key: ObjectKey,
    ) -> BoxFuture<'_, Result<Option<ObjectInfo>, BucketError>> {
        Box::pin(blocking(&self.inner, move |inner| {
            inner.head(bucket.as_str(), key.as_str())
        }))
    }

    fn list(
        &self,
        bucket: BucketName,
        prefix: String,
        after: Option<String>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Listing, BucketError>> {
        Box::pin(blocking(&self.inner, move |inner| {
            inner.list(bucket.as_str(), &prefix, after.as_deref(), limit)
        }))
    }

    fn delete(
        &self,
        bucket: BucketName,
        key: ObjectKey,
    ) -> BoxFuture<'_, Result<Option<ObjectInfo>, BucketError>> {
        Box::pin(blocking(&self.inner, move |inner| {
            inner.delete(bucket.as_str(), key.as_str())
        }))
    }
}

/// The file's content as a stream of chunks.
fn read_stream(file: tokio::fs::File) -> ByteStream {
    futures::stream::try_unfold(file, |mut file| async move {
        let mut buf = vec![0u8; READ_CHUNK];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((Bytes::from(buf), file)))
    })
    .into_stream()
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parts: &[&'static [u8]]) -> ByteStream {
        let parts: Vec<_> = parts.iter().map(|p| Ok(Bytes::from_static(p))).collect();
        futures::stream::iter(parts).boxed()
    }

    async fn read(store: &LocalDisk, bucket: &BucketName, key: &str) -> Option<Vec<u8>> {
        let o = store
            .get(bucket.clone(), key.parse().unwrap())
            .await
            .unwrap()?;
        let chunks: Vec<Bytes> = o.body.try_collect().await.unwrap();
        Some(chunks.concat())
    }

    fn blobs(dir: &Path) -> usize {
        std::fs::read_dir(dir.join("blobs"))
            .unwrap()
            .map(|s| std::fs::read_dir(s.unwrap().path()).unwrap().count())
            .sum()
    }

    #[tokio::test]
    async fn objects_round_trip_share_content_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDisk::open(dir.path()).unwrap();
        let b: BucketName = "photos".parse().unwrap();
        let info = store
            .put(
                b.clone(),
                "a/cat.png".parse().unwrap(),
                Some("image/png".into()),
                body(&[b"me", b"ow"]),
                100,
            )
            .await
            .unwrap();
        assert_eq!(info.size, 4);
        assert_eq!(info.etag, hex::encode(Sha256::digest(b"meow")));
        assert_eq!(read(&store, &b, "a/cat.png").await.unwrap(), b"meow");
        let head = store
            .head(b.clone(), "a/cat.png".parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(head.content_type.as_deref(), Some("image/png"));
        // Same content under another key shares the blob.
        store
            .put(b.clone(), "b".parse().unwrap(), None, body(&[b"meow"]), 100)
            .await
            .unwrap();
        assert_eq!(blobs(dir.path()), 1);
        // Replacing drops the old content once nothing points at it.
        store
            .put(b.clone(), "b".parse().unwrap(), None, body(&[b"purr"]), 100)
            .await
            .unwrap();
        assert_eq!(blobs(dir.path()), 2);
        assert_eq!(read(&store, &b, "b").await.unwrap(), b"purr");
        // Too large: refused, the old object stays, no temporary file left.
        let e = store
            .put(
                b.clone(),
                "b".parse().unwrap(),
                None,
                body(&[b"0123456789"]),
                5,
            )
            .await;
        assert!(matches!(e, Err(BucketError::TooLarge(5))));
        assert_eq!(read(&store, &b, "b").await.unwrap(), b"purr");
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        // Another bucket is another namespace.
        let other: BucketName = "other".parse().unwrap();
        assert_eq!(read(&store, &other, "b").await, None);
        // Delete answers what it removed, then nothing.
        let gone = store
            .delete(b.clone(), "a/cat.png".parse().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(gone.size, 4);
        assert!(
            store
                .delete(b.clone(), "a/cat.png".parse().unwrap())
                .await
                .unwrap()
                .is_none()
        );
        store.delete(b.clone(), "b".parse().unwrap()).await.unwrap();
        assert_eq!(blobs(dir.path()), 0);
    }

    #[tokio::test]
    async fn listing_pages_through_a_prefix_in_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDisk::open(dir.path()).unwrap();
        let b: BucketName = "logs".parse().unwrap();
        for k in ["img/b", "img/a", "img-x", "img/c/d", "other"] {
            store
                .put(b.clone(), k.parse().unwrap(), None, body(&[b"x"]), 10)
                .await
                .unwrap();
        }
        let first = store.list(b.clone(), "img/".into(), None, 2).await.unwrap();
        let keys: Vec<_> = first.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["img/a", "img/b"]);
        let rest = store
            .list(b.clone(), "img/".into(), first.next_after, 2)
            .await
            .unwrap();
        let keys: Vec<_> = rest.objects.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["img/c/d"]);
        assert!(rest.next_after.is_none());
        let all = store.list(b.clone(), "img".into(), None, 10).await.unwrap();
        assert_eq!(all.objects.len(), 4);
        // `%` and `_` in a prefix are plain text.
        let none = store.list(b.clone(), "i_g".into(), None, 10).await.unwrap();
        assert!(none.objects.is_empty());
    }

    #[tokio::test]
    async fn reopening_removes_crash_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let b: BucketName = "b".parse().unwrap();
        {
            let store = LocalDisk::open(dir.path()).unwrap();
            store
                .put(
                    b.clone(),
                    "kept".parse().unwrap(),
                    None,
                    body(&[b"kept"]),
                    10,
                )
                .await
                .unwrap();
        }
        std::fs::write(dir.path().join("tmp").join("half"), b"half").unwrap();
        let orphan = dir.path().join("blobs").join("ff");
        std::fs::create_dir_all(&orphan).unwrap();
        std::fs::write(orphan.join("ff00"), b"orphan").unwrap();
        let store = LocalDisk::open(dir.path()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
        assert_eq!(blobs(dir.path()), 1);
        assert_eq!(read(&store, &b, "kept").await.unwrap(), b"kept");
    }
}
