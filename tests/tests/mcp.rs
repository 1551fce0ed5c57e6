//! `crabboxctl mcp` end to end, driven by a client that is not ours: the
//! official MCP Python SDK (tests/python/mcp_client.py) speaks to the real
//! `crabboxctl mcp` over stdio, which talks to the real daemon, our
//! coordinator and a real OpenSSH sshd on loopback.

use std::{path::Path, process::Stdio, time::Duration};

use crabbox_coordinator::testing::TestCoordinator;
use crabbox_tests::{TestDaemon, TestSshd, bins::bin, require_sshd};
use serde_json::{Value, json};

const LEASE: &str = "cbx_0000000000c7";

/// The result budget every tool result must stay within.
const RESULT_LIMIT: u64 = 64 * 1024;

/// Whether a prerequisite that CI installs may be skipped when missing:
/// only outside CI, so CI never silently skips these tests.
fn may_skip() -> bool {
    std::env::var_os("CI").is_none()
}

/// Whether python3 has the official MCP SDK; panics in CI when it has not.
fn python_mcp() -> bool {
    let probe = std::process::Command::new("python3")
        .args(["-c", "import mcp.client.stdio"])
        .output();
    if probe.is_ok_and(|o| o.status.success()) {
        return true;
    }
    assert!(may_skip(), "python3 with the `mcp` SDK is required in CI");
    eprintln!("SKIP: python3 without the MCP SDK (pip install mcp)");
    false
}

async fn post(coord: &TestCoordinator, path: &str, body: Value) -> Value {
    let (status, v) = coord
        .request("POST", path, &coord.shared_token, &body)
        .await
        .unwrap();
    assert!(status == 200 || status == 201, "{path}: {status} {v}");
    v
}

async fn append(coord: &TestCoordinator, run: &str, stream: &str, data: &str) {
    post(
        coord,
        &format!("/v1/runs/{run}/events"),
        json!({"type": stream, "stream": stream, "data": data}),
    )
    .await;
}

/// Our coordinator with `LEASE` registered at `sshd`, a daemon that
/// reaches it (with the per-lease key file in place), and a run on it.
async fn setup(sshd: &TestSshd) -> (TestCoordinator, TestDaemon, String) {
    let coord = TestCoordinator::start().await;
    let mut body = sshd.registration();
    body["slug"] = json!("mcp-crab");
    coord
        .register_lease_with(&coord.shared_token, LEASE, &body)
        .await
        .unwrap();
    let d = TestDaemon::builder()
        .coordinator(&coord.base_url, &coord.shared_token)
        .start()
        .await;
    let dir = d.layout.config.join("crabbox/testboxes").join(LEASE);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(&sshd.client_key, dir.join("id_ed25519")).unwrap();
    let v = post(
        &coord,
        "/v1/runs",
        json!({"leaseID": LEASE, "command": ["make", "test"], "provider": "ssh", "class": "standard", "serverType": "registered"}),
    )
    .await;
    let run = v["run"]["id"].as_str().unwrap().to_owned();
    (coord, d, run)
}

fn client(d: &TestDaemon, run: &str) -> tokio::process::Child {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/mcp_client.py");
    tokio::process::Command::new("python3")
        .arg(script)
        .arg(bin("crabboxctl"))
        .arg(&d.socket)
        .arg(LEASE)
        .arg(run)
        .env("HOME", &d.layout.home)
        .env("XDG_RUNTIME_DIR", &d.layout.runtime)
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn python3")
}

fn ok<'a>(report: &'a Value, step: &str) -> &'a Value {
    let r = &report[step];
    assert_eq!(r["is_error"], false, "{step}: {r}");
    assert!(r["bytes"].as_u64().unwrap() <= RESULT_LIMIT, "{step}");
    &r["json"]
}

fn tool_error<'a>(report: &'a Value, step: &str) -> &'a str {
    let r = &report[step];
    assert_eq!(r["is_error"], true, "{step}: {r}");
    r["text"].as_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_sdk_drives_leases_exec_runs_and_egress_over_stdio() {
    require_sshd!();
    if !python_mcp() {
        return;
    }
    let sshd = TestSshd::start().await;
    let (coord, d, run) = setup(&sshd).await;
    // Output before the client reads, more while it reads, then the end.
    append(&coord, &run, "stdout", "compiling\n").await;
    append(&coord, &run, "stderr", "warning: unused\n").await;
    let child = client(&d, &run);
    // A page's worth and more of output, so the reader pages by cursor.
    let line = format!("{}\n", "y".repeat(1000));
    for _ in 0..100 {
        append(&coord, &run, "stdout", &line).await;
    }
    append(&coord, &run, "stdout", "all tests passed\n").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    post(
        &coord,
        &format!("/v1/runs/{run}/finish"),
        json!({"exitCode": 0}),
    )
    .await;
    let out = tokio::time::timeout(Duration::from_secs(180), child.wait_with_output())
        .await
        .expect("the MCP client finished")
        .unwrap();
    assert!(
        out.status.success(),
        "MCP client failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        d.stderr()
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();

    // Initialize and list tools: every tool the issue names, with schemas
    // and annotations.
    assert_eq!(report["server"]["name"], "crabboxctl");
    let tools = report["tools"].as_object().unwrap();
    for name in [
        "lease_list",
        "lease_keep",
        "lease_release",
        "lease_heartbeat",
        "exec",
        "run_output",
        "run_wait",
        "egress_status",
        "egress_stop",
        "copy_to_lease",
        "copy_from_lease",
        "tasks_list",
        "run_start",
        "run_list",
        "run_stop",
        "egress_start",
    ] {
        let t = &tools[name];
        assert!(t["description"].as_str().unwrap().len() > 40, "{name}: {t}");
        assert_eq!(t["schema"]["type"], "object", "{name}: {t}");
    }
    assert_eq!(
        tools["exec"]["schema"]["required"],
        json!(["lease_id", "command"])
    );
    for ro in [
        "lease_list",
        "tasks_list",
        "egress_status",
        "run_output",
        "run_wait",
    ] {
        assert_eq!(tools[ro]["read_only"], true, "{ro}");
    }
    for destructive in ["lease_release", "egress_stop", "run_stop"] {
        assert_eq!(tools[destructive]["destructive"], true, "{destructive}");
    }

    // Keep the lease; it is listed.
    let kept = ok(&report, "keep");
    assert_eq!(kept["id"], LEASE, "{kept}");
    assert_eq!(kept["lease"]["slug"], "mcp-crab", "{kept}");
    let leases = ok(&report, "leases");
    assert_eq!(leases["leases"][0]["id"], LEASE, "{leases}");
    assert_eq!(leases["next_cursor"], Value::Null);

    // Exec: exit code, stdout and stderr apart; stdin forwarded.
    let e = ok(&report, "exec");
    assert_eq!(e["exit_code"], 7, "{e}\n{}", d.stderr());
    assert_eq!(e["stdout"], "out\n");
    assert_eq!(e["stderr"], "err\n");
    assert_eq!(e["timed_out"], false);
    let e = ok(&report, "exec_stdin");
    assert_eq!(e["stdout"].as_str().unwrap().trim(), "5", "{e}");
    // 1 MiB of output comes back bounded: its end, and how much came before.
    let e = ok(&report, "exec_big");
    assert_eq!(e["exit_code"], 0, "{e}");
    assert_eq!(e["stdout_bytes"], 1024 * 1024 + 4);
    let kept_out = e["stdout"].as_str().unwrap();
    assert!(
        kept_out.ends_with("xxxEND\n"),
        "{}",
        &kept_out[kept_out.len() - 20..]
    );
    assert_eq!(
        e["stdout_omitted_bytes"].as_u64().unwrap() + kept_out.len() as u64,
        1024 * 1024 + 4
    );
    assert!(kept_out.len() > 32 * 1024, "{}", kept_out.len());
    // A command past its timeout is ended: SIGTERM is 128+15.
    let e = ok(&report, "exec_timeout");
    assert_eq!(e["timed_out"], true, "{e}");
    assert_eq!(e["exit_code"], 143, "{e}");

    // A file to the lease and back, unchanged.
    assert_eq!(ok(&report, "copy_to")["direction"], "to_lease");
    assert!(ok(&report, "copy_from")["bytes"].as_u64().unwrap() >= 5000);
    assert_eq!(report["copy_same"], true, "{}", report["copy_from"]);

    // The run read from a cursor to its end: every event once, in order,
    // over more than one bounded page.
    let pages = report["run_pages"].as_array().unwrap();
    assert!(pages.len() >= 2, "{}", pages.len());
    let mut seqs = Vec::new();
    let mut stdout = String::new();
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(p["is_error"], false, "page {i}: {p}");
        assert!(p["bytes"].as_u64().unwrap() <= RESULT_LIMIT, "page {i}");
        for ev in p["json"]["events"].as_array().unwrap() {
            seqs.push(ev["seq"].as_u64().unwrap());
            if ev["stream"] == "stdout" {
                stdout.push_str(ev["data"].as_str().unwrap());
            }
        }
    }
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(stdout.starts_with("compiling\n"), "{}", &stdout[..40]);
    assert!(stdout.ends_with("all tests passed\n"));
    assert_eq!(stdout.matches(&line).count(), 100);
    let last = &pages.last().unwrap()["json"];
    assert_eq!(last["end"]["outcome"], "succeeded", "{last}");
    assert_eq!(last["end"]["exit_code"], 0);
    let w = ok(&report, "run_wait");
    assert_eq!(w["end"]["outcome"], "succeeded", "{w}");
    assert!(
        w["stdout_tail"]
            .as_str()
            .unwrap()
            .ends_with("all tests passed\n"),
        "{w}"
    );
    assert_eq!(w["stderr_tail"], "warning: unused\n");

    // A run started through MCP: the command's output read from a cursor
    // to its end, and its exit code.
    let started = ok(&report, "run_start");
    let own = started["run_id"].as_str().unwrap();
    assert!(own.starts_with("run_"), "{started}");
    assert_eq!(started["egress"], false);
    let mut out = String::new();
    let mut err = String::new();
    for p in report["own_pages"].as_array().unwrap() {
        assert_eq!(p["is_error"], false, "{p}");
        for ev in p["json"]["events"].as_array().unwrap() {
            match ev["stream"].as_str() {
                Some("stdout") => out.push_str(ev["data"].as_str().unwrap()),
                Some("stderr") => err.push_str(ev["data"].as_str().unwrap()),
                _ => {}
            }
        }
    }
    assert_eq!(out, "start\nline 1\nline 2\nline 3\n", "{}", d.stderr());
    assert_eq!(err, "oops\n");
    let end = &report["own_pages"].as_array().unwrap().last().unwrap()["json"]["end"];
    assert_eq!(end["outcome"], "failed", "{end}");
    assert_eq!(end["exit_code"], 3);
    let w = ok(&report, "own_wait");
    assert_eq!(w["end"]["exit_code"], 3, "{w}");
    assert_eq!(w["stdout_tail"], "start\nline 1\nline 2\nline 3\n");
    let runs = ok(&report, "run_list")["runs"].as_array().unwrap();
    let listed = runs
        .iter()
        .find(|r| r["run_id"] == own)
        .expect("run listed");
    assert_eq!(listed["label"], "mcp-test", "{listed}");
    // A long run stopped: it ends, killed by SIGTERM.
    let long = ok(&report, "long_start")["run_id"].as_str().unwrap();
    assert_eq!(ok(&report, "run_stop")["was_running"], true);
    let w = ok(&report, "long_wait");
    assert_eq!(w["run_id"], long);
    assert_eq!(w["end"]["outcome"], "failed", "{w}");

    // Egress status: the coordinator's view, no local bridge.
    let eg = ok(&report, "egress_status");
    assert_eq!(eg["lease_id"], LEASE, "{eg}");
    assert_eq!(eg["coordinator"]["active"], false, "{eg}");
    assert_eq!(eg["local"], Value::Null);

    // Egress start without an allowlist: refused with crabboxctl's sentence.
    let cli = d.ctl(&["egress", "start", "--id", LEASE]).await;
    assert!(!cli.status.success());
    let cli_text = String::from_utf8_lossy(&cli.stderr).trim().to_owned();
    let text = tool_error(&report, "egress_start_no_allowlist").trim();
    assert_eq!(text, cli_text);
    assert!(text.contains("allow"), "{text}");
    // Stopping egress that does not run is not an error and says so.
    let stop = ok(&report, "egress_stop_nothing");
    assert_eq!(stop["host_stopped"], false, "{stop}");

    // The task table, whole and by kind.
    let tasks = ok(&report, "tasks")["tasks"].as_array().unwrap();
    assert!(tasks.iter().any(|t| t["kind"] == "api-server"), "{tasks:?}");
    assert!(tasks.iter().any(|t| t["kind"] == "ssh-mux"), "{tasks:?}");
    let kinds = ok(&report, "tasks_kind")["tasks"].as_array().unwrap();
    assert_eq!(kinds.len(), 1, "{kinds:?}");
    assert_eq!(kinds[0]["kind"], "lease-keeper");

    // Bad arguments are tool errors that say what is wrong; the session
    // goes on afterwards.
    for (step, needle) in [
        ("bad_missing", "missing field `lease_id`"),
        ("bad_type", "expected a sequence"),
        ("bad_unknown_field", "unknown field `bogus`"),
        ("bad_kind", "\"nope\" is not a task kind"),
        ("bad_cursor", "not one this tool handed out"),
    ] {
        let text = tool_error(&report, step);
        assert!(text.contains(needle), "{step}: {text}");
    }
    // An unknown lease: the coordinator's refusal, in crabboxctl's sentence.
    let cli = d.ctl(&["lease", "keep", "--id", "cbx_0000000dead0"]).await;
    let cli_text = String::from_utf8_lossy(&cli.stderr).trim().to_owned();
    assert!(!cli.status.success());
    assert_eq!(tool_error(&report, "unknown_lease").trim(), cli_text);
    ok(&report, "after_errors");

    // One heartbeat, the (empty) host-bridge list, then the release: the
    // coordinator's record says released and the daemon keeps nothing.
    let hb = ok(&report, "heartbeat");
    assert_eq!(hb["id"], LEASE, "{hb}");
    assert_eq!(hb["slug"], "mcp-crab", "{hb}");
    assert!(hb["lastTouchedAt"].is_string(), "{hb}");
    let hosts = ok(&report, "egress_list");
    assert_eq!(hosts["hosts"], serde_json::json!([]), "{hosts}");
    let released = ok(&report, "release");
    assert_eq!(released["id"], LEASE, "{released}");
    assert_eq!(released["state"], "released", "{released}");
    let after = ok(&report, "leases_after_release");
    assert_eq!(after["leases"], serde_json::json!([]), "{after}");

    // No secret in any result.
    let all = report.to_string();
    assert!(!all.contains(&coord.shared_token), "the token leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_daemon_is_a_tool_error_with_the_cli_sentence() {
    if !python_mcp() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let script = r#"
import asyncio, json, sys
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
async def main():
    p = StdioServerParameters(command=sys.argv[1], args=["--socket", sys.argv[2], "mcp"])
    async with stdio_client(p) as (r, w):
        async with ClientSession(r, w) as s:
            await s.initialize()
            res = await s.call_tool("lease_list", {})
            print(json.dumps({"is_error": res.is_error, "text": res.content[0].text}))
asyncio.run(main())
"#;
    let out = tokio::process::Command::new("python3")
        .args(["-c", script])
        .arg(bin("crabboxctl"))
        .arg(&socket)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["is_error"], true, "{v}");
    // The same text `crabboxctl lease list` prints on stderr.
    let cli = tokio::process::Command::new(bin("crabboxctl"))
        .arg("--socket")
        .arg(&socket)
        .args(["lease", "list"])
        .output()
        .await
        .unwrap();
    assert_eq!(cli.status.code(), Some(3));
    assert_eq!(
        v["text"].as_str().unwrap().trim(),
        String::from_utf8_lossy(&cli.stderr).trim()
    );
    assert!(v["text"].as_str().unwrap().contains("hint: "), "{v}");
}
