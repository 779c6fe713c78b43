//! Cluster mode (timely's processes): two real processes of `replay --dry-run` on loopback give
//! together exactly the exports of one process, and keep standard output to exports only (the
//! connection progress goes to standard error).

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

fn replay(args: &[&str]) -> std::process::Child {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    Command::new(env!("CARGO_BIN_EXE_streamdest"))
        .args(["replay", "--config"])
        .arg(root.join("examples/config.json"))
        .arg("--events")
        .arg(root.join("examples/replay/events.ndjson"))
        .args(["--dry-run", "--workers", "1"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start streamdest")
}

fn lines(child: std::process::Child) -> (Vec<String>, String) {
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    (
        stdout.lines().map(String::from).collect(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `mappingCreatedAt`/`mappingUpdatedAt` default to the load time, which differs by process.
fn canonical(line: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("standard output holds only exports: {line:?}: {e}"));
    if let Some(ups) = v
        .pointer_mut("/payload/segmentMembership/ups")
        .and_then(|u| u.as_object_mut())
    {
        for audience in ups.values_mut() {
            if let Some(a) = audience.as_object_mut() {
                a.remove("mappingCreatedAt");
                a.remove("mappingUpdatedAt");
            }
        }
    }
    v.to_string()
}

#[test]
fn two_processes_export_what_one_does_and_keep_stdout_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hostfile = dir.path().join("hosts");
    let mut f = std::fs::File::create(&hostfile).expect("hostfile");
    writeln!(f, "127.0.0.1:{}\n127.0.0.1:{}", free_port(), free_port()).expect("write");
    let hosts = hostfile.to_str().expect("utf-8 path");

    let (single, _) = lines(replay(&[]));
    assert!(!single.is_empty(), "the example history exports something");
    let p0 = replay(&["--processes", "2", "--process", "0", "--hostfile", hosts]);
    // Process 0 waits for process 1 a while: timely reports that wait as it goes.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let p1 = replay(&["--processes", "2", "--process", "1", "--hostfile", hosts]);
    let (mut both, stderr0) = lines(p0);
    let (more, _) = lines(p1);
    both.extend(more);
    assert!(
        stderr0.contains("connecting to the cluster's processes at 127.0.0.1:"),
        "{stderr0}"
    );

    let mut single: Vec<String> = single.iter().map(|l| canonical(l)).collect();
    let mut both: Vec<String> = both.iter().map(|l| canonical(l)).collect();
    single.sort();
    both.sort();
    assert_eq!(both, single);
}
