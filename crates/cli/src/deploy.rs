//! `nimbus deploy`: build (optionally), upload what the node lacks, apply.

use crate::client::{Admin, decode};
use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Method, StatusCode};
use nimbus_api::{ComponentInfo, DeployFunction, DeployRequest, DeployResponse};
use nimbus_manifest::{BuildStep, Manifest};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

/// Runs each distinct build step of the manifest once, in order.
pub fn build(manifest: &Manifest) -> anyhow::Result<()> {
    let mut done: Vec<&BuildStep> = Vec::new();
    for (name, f) in &manifest.functions {
        let Some(step) = &f.build else { continue };
        if done.contains(&step) {
            continue;
        }
        eprintln!(
            "building {name}: {} (in {})",
            step.command,
            step.workdir.display()
        );
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(&step.command)
            .current_dir(&step.workdir)
            .status()
            .with_context(|| {
                format!(
                    "cannot run the build command of `{name}` in {}",
                    step.workdir.display()
                )
            })?;
        if !status.success() {
            bail!(
                "the build command of `{name}` failed ({status}): {}",
                step.command
            );
        }
        done.push(step);
    }
    // A build that succeeded but left no component would otherwise fail
    // later, as a file the user is told to build.
    for (name, f) in &manifest.functions {
        if f.build.is_some() && !f.component.is_file() {
            let moved = match std::env::var_os("CARGO_TARGET_DIR") {
                Some(dir) => format!(
                    "; CARGO_TARGET_DIR is set ({}) and moves cargo's output there: add `--target-dir target` to the command, or unset it",
                    Path::new(&dir).display()
                ),
                None => String::new(),
            };
            bail!(
                "the build command of `{name}` succeeded but left no component at {}: make the command write it there, or fix `component` in the manifest{moved}",
                f.component.display()
            );
        }
    }
    Ok(())
}

/// Uploads the components the node lacks and applies the manifest.
pub async fn deploy(admin: &Admin, manifest: &Manifest) -> anyhow::Result<DeployResponse> {
    let mut functions = BTreeMap::new();
    // Functions sharing a component file read, hash and upload it once.
    let mut uploaded: std::collections::HashMap<&Path, String> = std::collections::HashMap::new();
    for (name, f) in &manifest.functions {
        let digest = match uploaded.get(f.component.as_path()) {
            Some(digest) => digest.clone(),
            None => {
                let digest = upload(admin, name.as_str(), &f.component).await?;
                uploaded.insert(&f.component, digest.clone());
                digest
            }
        };
        functions.insert(
            name.clone(),
            DeployFunction {
                component: digest,
                config: f.config.clone(),
            },
        );
    }
    let request = DeployRequest {
        app: manifest.app.clone(),
        functions,
    };
    admin
        .call(Method::POST, "/v1/deploy", Some(&request))
        .await
        .context("deploy refused")
}

/// Uploads one component unless the node has it; returns its digest.
pub async fn upload(admin: &Admin, function: &str, path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| {
        format!(
            "cannot read the component of `{function}` at {}: build it first (`nimbus deploy --build`) or fix `component` in nimbus.toml",
            path.display()
        )
    })?;
    let digest = hex::encode(Sha256::digest(&bytes));
    let probe = admin
        .raw(
            Method::HEAD,
            &format!("/v1/components/{digest}"),
            "application/json",
            Bytes::new(),
        )
        .await?;
    if probe.status == StatusCode::OK {
        return Ok(digest);
    }
    let reply = admin
        .raw(
            Method::PUT,
            &format!("/v1/components/{digest}"),
            "application/wasm",
            Bytes::from(bytes),
        )
        .await?;
    let info: ComponentInfo = decode(reply).with_context(|| {
        format!(
            "the component of `{function}` ({}) was refused",
            path.display()
        )
    })?;
    Ok(info.digest)
}
