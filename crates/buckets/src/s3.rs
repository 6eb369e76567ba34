//! Buckets kept in an S3-compatible service (AWS S3, MinIO, Ceph, R2...)
//! through the `object_store` crate. All Nimbus buckets share one S3
//! bucket: object `key` of bucket `b` is stored as `<prefix>/b/key`.
//!
//! Small bodies go up in one request; a body larger than one part is sent
//! as a multipart upload while it is still being received, so memory stays
//! bounded by a few parts whatever the object's size.

use crate::{
    BucketError, BucketName, BucketStore, ByteStream, Listing, Object, ObjectInfo, ObjectKey, page,
};
use futures::future::BoxFuture;
use futures::{StreamExt as _, TryStreamExt as _};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, GetOptions, ObjectStore, ObjectStoreExt as _, PutMultipartOptions,
    PutOptions, PutPayload, WriteMultipart,
};
use std::sync::Arc;

/// Size of one part of a multipart upload (S3's minimum is 5 MiB).
const PART_BYTES: usize = 8 << 20;
/// Parts uploaded at once while a body streams in.
const PARTS_IN_FLIGHT: usize = 2;
/// Retries of a failed request (the crate's default of 10 over three
/// minutes would hold a client, or the node's start, that long).
const MAX_RETRIES: usize = 3;
/// No retry starts later than this after the first try.
const RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(15);

/// Objects in an S3-compatible service.
pub struct S3Store {
    store: Arc<dyn ObjectStore>,
    /// Path parts every object's path starts with (may be empty).
    prefix: Vec<String>,
    /// What the store is, for messages (never credentials).
    shown: String,
}

fn backend(e: object_store::Error) -> BucketError {
    BucketError::Backend(e.to_string())
}

impl S3Store {
    /// Connects to the store named by `url`, `s3://BUCKET[/PREFIX]`, with
    /// the settings `object_store` reads from the environment
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`,
    /// `AWS_ENDPOINT_URL` for a service other than AWS, `AWS_ALLOW_HTTP`).
    /// Nothing is sent until [`S3Store::check`].
    pub fn connect(url: &str) -> Result<Self, BucketError> {
        let bad = || {
            BucketError::Backend(format!(
                "invalid object store url `{url}`: write s3://BUCKET or s3://BUCKET/PREFIX"
            ))
        };
        let rest = url.strip_prefix("s3://").ok_or_else(bad)?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad());
        }
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_retry(object_store::RetryConfig {
                max_retries: MAX_RETRIES,
                retry_timeout: RETRY_WINDOW,
                ..Default::default()
            })
            .build()
            .map_err(|e| BucketError::Backend(format!("cannot use {url}: {e}")))?;
        Ok(Self {
            store: Arc::new(store),
            prefix: prefix
                .split('/')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect(),
            shown: format!("s3://{rest}"),
        })
    }

    /// Proves the store answers with these credentials by listing at most
    /// one object, so a wrong setting fails at start.
    pub async fn check(&self) -> Result<(), BucketError> {
        let root = self.path_of(&[]);
        let mut listing = self.store.list(Some(&root));
        match listing.next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(BucketError::Backend(format!(
                "{} does not answer: {e}",
                self.shown
            ))),
        }
    }

    fn path_of(&self, parts: &[&str]) -> Path {
        Path::from_iter(
            self.prefix
                .iter()
                .map(String::as_str)
                .chain(parts.iter().copied())
                .flat_map(|p| p.split('/')),
        )
    }

    fn object_path(&self, bucket: &BucketName, key: &ObjectKey) -> Path {
        self.path_of(&[bucket.as_str(), key.as_str()])
    }

    /// The key of `path` within `bucket`.
    fn key_of(&self, bucket: &BucketName, path: &Path) -> Option<String> {
        let mut parts = path.parts();
        for p in &self.prefix {
            if parts.next()?.as_ref() != p {
                return None;
            }
        }
        if parts.next()?.as_ref() != bucket.as_str() {
            return None;
        }
        let key: Vec<String> = parts.map(|p| decode(p.as_ref())).collect();
        (!key.is_empty()).then(|| key.join("/"))
    }
}

/// A path part as the key wrote it: `object_store` percent-encodes
/// characters some stores refuse.
fn decode(part: &str) -> String {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn info(key: String, meta: &object_store::ObjectMeta, attributes: &Attributes) -> ObjectInfo {
    ObjectInfo {
        key,
        size: meta.size,
        etag: meta
            .e_tag
            .as_deref()
            .unwrap_or_default()
            .trim_matches('"')
            .to_owned(),
        modified_ms: meta.last_modified.timestamp_millis(),
        content_type: attributes
            .get(&Attribute::ContentType)
            .map(|v| v.as_ref().to_owned()),
    }
}

/// Reads from `body` until `buf` holds at least `want` bytes or the body
/// ends; `false` when it ended.
async fn fill(
    body: &mut ByteStream,
    buf: &mut Vec<u8>,
    want: usize,
    total: &mut u64,
    max_bytes: u64,
) -> Result<bool, BucketError> {
    while buf.len() < want {
        match body.next().await {
            None => return Ok(false),
            Some(chunk) => {
                let chunk = chunk.map_err(BucketError::Body)?;
                *total += chunk.len() as u64;
                if *total > max_bytes {
                    return Err(BucketError::TooLarge(max_bytes));
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
    Ok(true)
}

impl BucketStore for S3Store {
    fn put(
        &self,
        bucket: BucketName,
        key: ObjectKey,
        content_type: Option<String>,
        mut body: ByteStream,
        max_bytes: u64,
    ) -> BoxFuture<'_, Result<ObjectInfo, BucketError>> {
        Box::pin(async move {
            let path = self.object_path(&bucket, &key);
            let mut attributes = Attributes::new();
            if let Some(ct) = &content_type {
                attributes.insert(Attribute::ContentType, ct.clone().into());
            }
            let mut total = 0u64;
            let mut buf = Vec::new();
            let more = fill(&mut body, &mut buf, PART_BYTES + 1, &mut total, max_bytes).await?;
            let result = if !more {
                let opts = PutOptions {
                    attributes,
                    ..Default::default()
                };
                self.store
                    .put_opts(&path, PutPayload::from(buf), opts)
                    .await
                    .map_err(backend)?
            } else {
                let opts = PutMultipartOptions {
                    attributes,
                    ..Default::default()
                };
                let upload = self
                    .store
                    .put_multipart_opts(&path, opts)
                    .await
                    .map_err(backend)?;
                let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
                writer.write(&buf);
                let streamed = async {
                    loop {
                        buf.clear();
                        let more =
                            fill(&mut body, &mut buf, PART_BYTES, &mut total, max_bytes).await?;
                        writer
                            .wait_for_capacity(PARTS_IN_FLIGHT)
                            .await
                            .map_err(backend)?;
                        writer.write(&buf);
                        if !more {
                            return Ok::<(), BucketError>(());
                        }
                    }
                }
                .await;
                match streamed {
                    Ok(()) => writer.finish().await.map_err(backend)?,
                    Err(e) => {
                        if let Err(abort) = writer.abort().await {
                            tracing::warn!(error = %abort, "aborting a multipart upload failed");
                        }
                        return Err(e);
                    }
                }
            };
            // The store's own view (size, time) of what it now holds.
            let meta = self.store.head(&path).await.map_err(backend)?;
            let mut stored = info(key.as_str().to_owned(), &meta, &Attributes::new());
            if let Some(tag) = result.e_tag {
                stored.etag = tag.trim_matches('"').to_owned();
            }
            stored.content_type = content_type;
            Ok(stored)
        })
    }

    fn get(
        &self,
        bucket: BucketName,
        key: ObjectKey,
    ) -> BoxFuture<'_, Result<Option<Object>, BucketError>> {
        Box::pin(async move {
            let path = self.object_path(&bucket, &key);
            match self.store.get_opts(&path, GetOptions::default()).await {
                Ok(r) => {
                    let info = info(key.as_str().to_owned(), &r.meta, &r.attributes);
                    let body = r
                        .into_stream()
                        .map_err(|e| std::io::Error::other(e.to_string()))
                        .boxed();
                    Ok(Some(Object { info, body }))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(backend(e)),
            }
        })
    }

    fn head(
        &self,
        bucket: BucketName,
        key: ObjectKey,
    ) -> BoxFuture<'_, Result<Option<ObjectInfo>, BucketError>> {
        Box::pin(async move {
            let path = self.object_path(&bucket, &key);
            let opts = GetOptions {
                head: true,
                ..Default::default()
            };
            match self.store.get_opts(&path, opts).await {
                Ok(r) => Ok(Some(info(key.as_str().to_owned(), &r.meta, &r.attributes))),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(backend(e)),
            }
        })
    }

    fn list(
        &self,
        bucket: BucketName,
        prefix: String,
        after: Option<String>,
        limit: usize,
    ) -> BoxFuture<'_, Result<Listing, BucketError>> {
        Box::pin(async move {
            // The store lists whole path parts: list under the prefix's
            // directory, starting where the prefix (or the page) begins,
            // and keep the keys that start with the prefix. S3 lists in key
            // order, so the first key past the prefix ends the page.
            let dir = prefix.rsplit_once('/').map_or("", |(d, _)| d);
            let root = if dir.is_empty() {
                self.path_of(&[bucket.as_str()])
            } else {
                self.path_of(&[bucket.as_str(), dir])
            };
            let mut stream = match after.as_deref().filter(|a| *a >= prefix.as_str()) {
                Some(a) => {
                    let offset = self.path_of(&[bucket.as_str(), a]);
                    self.store.list_with_offset(Some(&root), &offset)
                }
                None => self.store.list(Some(&root)),
            };
            let mut objects = Vec::new();
            while let Some(meta) = stream.next().await {
                let meta = meta.map_err(backend)?;
                let Some(key) = self.key_of(&bucket, &meta.location) else {
                    continue;
                };
                if !key.starts_with(&prefix) {
                    if key.as_str() > prefix.as_str() {
                        break;
                    }
                    continue;
                }
                if after.as_ref().is_some_and(|a| key.as_str() <= a.as_str()) {
                    continue;
                }
                objects.push(info(key, &meta, &Attributes::new()));
                if objects.len() > limit {
                    break;
                }
            }
            Ok(page(objects, limit))
        })
    }

    fn delete(
        &self,
        bucket: BucketName,
        key: ObjectKey,
    ) -> BoxFuture<'_, Result<Option<ObjectInfo>, BucketError>> {
        Box::pin(async move {
            let Some(gone) = self.head(bucket.clone(), key.clone()).await? else {
                return Ok(None);
            };
            let path = self.object_path(&bucket, &key);
            self.store.delete(&path).await.map_err(backend)?;
            Ok(Some(gone))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_paths_and_back() {
        let s = S3Store::connect("s3://data/nimbus/objects").unwrap();
        let b: BucketName = "photos".parse().unwrap();
        let k: ObjectKey = "2024/cat 1#.png".parse().unwrap();
        let p = s.object_path(&b, &k);
        assert!(p.as_ref().starts_with("nimbus/objects/photos/2024/"));
        assert_eq!(s.key_of(&b, &p).as_deref(), Some("2024/cat 1#.png"));
        let other: BucketName = "other".parse().unwrap();
        assert_eq!(s.key_of(&other, &p), None);
        assert!(S3Store::connect("s3://").is_err());
        assert!(S3Store::connect("http://x").is_err());
    }
}
