//! The dashboard end to end in headless Chromium (Debian's, driven by
//! Playwright from `tests/ui`): log in, see a function, invoke it, watch the
//! invocation appear with its log lines. Screenshots are kept in
//! `target/tmp/ui-screenshots`. Without Chromium, Node.js or the test's npm
//! packages the test fails in CI and says so loudly elsewhere.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;
use support::*;

const CHROMIUM: &str = "/usr/bin/chromium";

/// The directory of the browser test, once everything it needs is there.
fn browser_test() -> Option<PathBuf> {
    let dir = repo_root().join("tests/ui");
    let node = std::process::Command::new("node").arg("--version").output();
    let missing = if !Path::new(CHROMIUM).exists() {
        Some(format!("{CHROMIUM} (apt-get install chromium)"))
    } else if node.map(|o| !o.status.success()).unwrap_or(true) {
        Some("Node.js".to_owned())
    } else if !dir.join("node_modules/playwright-core").exists() {
        Some(format!(
            "playwright-core (npm ci --prefix {})",
            dir.display()
        ))
    } else {
        None
    };
    match missing {
        None => Some(dir),
        Some(what) if std::env::var_os("CI").is_some() => panic!("CI needs {what}"),
        Some(what) => {
            eprintln!("\n!!!!! SKIPPED: the dashboard test needs {what}\n");
            None
        }
    }
}

#[test]
fn dashboard_shows_a_function_its_invocation_and_its_logs() {
    let Some(dir) = browser_test() else {
        return;
    };
    let node = Node::start();
    let g = guests();
    node.deploy(&manifest(
        "ui",
        &[("printer", &g.testbed, "routes = [\"/t/*\"]")],
    ));
    let info: nimbus_api::NodeInfo = serde_json::from_str(
        &std::fs::read_to_string(node.data_dir().join(nimbus_api::NODE_FILE)).unwrap(),
    )
    .unwrap();
    let token = std::fs::read_to_string(node.data_dir().join(nimbus_api::TOKEN_FILE)).unwrap();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let mut child = std::process::Command::new("node")
        .arg(dir.join("dashboard.mjs"))
        .args([
            &info.admin_url,
            token.trim(),
            &shots.display().to_string(),
            "printer",
        ])
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the browser test did not finish in 180 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\nnode log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.log()
    );
    assert!(stdout.contains("\"ok\":true"), "{stdout}");
    for shot in ["1-login-refused.png", "2-functions.png", "3-invocation.png"] {
        let size = std::fs::metadata(shots.join(shot))
            .map(|m| m.len())
            .unwrap_or(0);
        assert!(size > 1000, "screenshot {shot} is missing");
    }
    eprintln!("dashboard screenshots: {}", shots.display());
}
