//! Interop with a client nobody here wrote: Python's `websockets` library,
//! installed into `.venv` by the test command.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use switchyard_tests::{python, GatewayProcess};

#[test]
fn python_websockets_subscribes_and_receives() {
    let python = python();
    assert!(
        python.exists(),
        "{} is missing: run the README's test command (scripts/test), which creates it",
        python.display()
    );
    let gw = GatewayProcess::start(&[]).expect("start");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/interop/subscribe.py");
    let mut child = Command::new(&python)
        .args([script, &gw.ws_url(), "py.topic", "5"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn python");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout"))
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(&line.expect("line")).expect("json"));

    let welcome = lines.next().expect("welcome");
    assert_eq!(welcome["op"], "welcome");
    assert!(welcome["connection_id"]
        .as_str()
        .is_some_and(|id| !id.is_empty()));
    let ready = lines.next().expect("ready");
    assert_eq!(ready["op"], "ready");
    assert_eq!(ready["position"]["offset"], 0);

    for n in 1..=5 {
        gw.publish("py.topic", &format!(r#"{{"n":{n},"s":"é\u00e9"}}"#))
            .expect("publish");
    }
    for n in 1..=5u64 {
        let message = lines.next().expect("message");
        assert_eq!(message["op"], "message");
        assert_eq!(message["topic"], "py.topic");
        assert_eq!(message["offset"], n);
        assert_eq!(message["data"], serde_json::json!({"n": n, "s": "éé"}));
    }
    let closed = lines.next().expect("closed");
    assert_eq!(closed, serde_json::json!({"op": "closed", "code": 1000}));
    assert!(child.wait().expect("wait").success());

    let series = "switchyard_connections_closed_total{code=\"1000\",initiator=\"client\"}";
    assert_eq!(
        gw.wait_metric(series, 1.0, Duration::from_secs(10))
            .expect("m"),
        1.0
    );
}
