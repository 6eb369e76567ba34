//! `nimbus objects`: put, get, list and delete objects of the node's
//! buckets through the admin API.

use crate::client::{Admin, ReadBody, decode, percent_encode, whole};
use crate::output::{Format, table};
use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt as _;
use std::io::Write as _;

/// `BUCKET/KEY` split in two; the key may itself hold `/`.
pub fn split(target: &str) -> anyhow::Result<(&str, &str)> {
    match target.split_once('/') {
        Some((b, k)) if !b.is_empty() && !k.is_empty() => Ok((b, k)),
        _ => bail!("`{target}` names no object: write BUCKET/KEY, e.g. uploads/images/cat.png"),
    }
}

fn object_path(bucket: &str, key: &str) -> String {
    format!("/v1/buckets/{bucket}/objects/{}", percent_encode(key, b"/"))
}

fn print_json(value: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Uploads `file` (`-` for stdin) as `BUCKET/KEY`, streaming it.
pub async fn put(
    admin: &Admin,
    target: &str,
    file: &str,
    content_type: Option<&str>,
    format: Format,
) -> anyhow::Result<()> {
    let (bucket, key) = split(target)?;
    let (body, length) = if file == "-" {
        (ReadBody::spawn(std::io::stdin()), None)
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("cannot read {file}"))?;
        let length = f
            .metadata()
            .with_context(|| format!("cannot read {file}"))?
            .len();
        (ReadBody::spawn(f), Some(length))
    };
    let mut headers = Vec::new();
    if let Some(ct) = content_type {
        headers.push(("content-type", ct));
    }
    let response = admin
        .open_stream(
            Method::PUT,
            &object_path(bucket, key),
            &headers,
            body,
            length,
            false,
        )
        .await?;
    let stored: serde_json::Value = decode(whole(response).await?)?;
    if format == Format::Json {
        return print_json(&stored);
    }
    let events = stored["invocation_ids"].as_array().map_or(0, Vec::len);
    println!(
        "stored {bucket}/{key} ({} bytes, etag {}); {events} event{} queued",
        stored["size"],
        stored["etag"].as_str().unwrap_or_default(),
        if events == 1 { "" } else { "s" }
    );
    Ok(())
}

/// Writes `BUCKET/KEY` to `out` (stdout when absent) as it arrives.
pub async fn get(admin: &Admin, target: &str, out: Option<&str>) -> anyhow::Result<()> {
    let (bucket, key) = split(target)?;
    let response = admin
        .open_stream(
            Method::GET,
            &object_path(bucket, key),
            &[],
            http_body_util::Empty::<Bytes>::new(),
            None,
            true,
        )
        .await?;
    if !response.status().is_success() {
        let _: serde_json::Value = decode(whole(response).await?)?;
        bail!("the node did not return the object");
    }
    let mut sink: Box<dyn std::io::Write> = match out {
        Some(path) => {
            Box::new(std::fs::File::create(path).with_context(|| format!("cannot write {path}"))?)
        }
        None => Box::new(std::io::stdout().lock()),
    };
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the download broke off")?;
        if let Some(data) = frame.data_ref() {
            sink.write_all(data).context("cannot write the object")?;
        }
    }
    sink.flush().context("cannot write the object")?;
    Ok(())
}

/// Lists `BUCKET[/PREFIX]`, every page.
pub async fn ls(admin: &Admin, target: &str, format: Format) -> anyhow::Result<()> {
    let (bucket, prefix) = target.split_once('/').unwrap_or((target, ""));
    let mut all = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!(
            "/v1/buckets/{bucket}/objects?limit=1000&prefix={}",
            percent_encode(prefix, b"/")
        );
        if let Some(a) = &after {
            path.push_str(&format!("&after={}", percent_encode(a, b"/")));
        }
        let page: serde_json::Value = admin.call(Method::GET, &path, None::<&()>).await?;
        all.extend(page["objects"].as_array().cloned().unwrap_or_default());
        match page["next_after"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    if format == Format::Json {
        return print_json(&serde_json::Value::Array(all));
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|o| {
            vec![
                o["key"].as_str().unwrap_or_default().to_owned(),
                o["size"].to_string(),
                o["etag"]
                    .as_str()
                    .unwrap_or_default()
                    .chars()
                    .take(16)
                    .collect(),
                crate::invocations::when(o["modified_ms"].as_i64().unwrap_or_default()),
            ]
        })
        .collect();
    print!("{}", table(&["KEY", "SIZE", "ETAG", "MODIFIED"], &rows));
    Ok(())
}

/// Deletes `BUCKET/KEY`.
pub async fn rm(admin: &Admin, target: &str, format: Format) -> anyhow::Result<()> {
    let (bucket, key) = split(target)?;
    let gone: serde_json::Value = admin
        .call(Method::DELETE, &object_path(bucket, key), None::<&()>)
        .await?;
    if format == Format::Json {
        return print_json(&gone);
    }
    let events = gone["invocation_ids"].as_array().map_or(0, Vec::len);
    println!(
        "deleted {bucket}/{key}; {events} event{} queued",
        if events == 1 { "" } else { "s" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn targets_split_at_the_first_slash() {
        assert_eq!(super::split("b/a/c.png").unwrap(), ("b", "a/c.png"));
        assert!(super::split("b").is_err());
        assert!(super::split("b/").is_err());
    }
}
