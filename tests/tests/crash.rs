//! A gateway that dies unplanned (`kill -9`: no drain, no close frame, no
//! hint) under thousands of real client sessions and a running publisher.
//! Its clients all see 1006 at the same instant; they spread their first
//! retry over the abnormal window (client policy), the survivors' admission
//! control sheds what exceeds their accept rate with 4003 + `retry_ms`, and
//! every client resumes every topic from the Redis backplane with nothing
//! lost. With the memory broker the log dies with the process, and the
//! clients are told so. bench/crash.sh measures the same at 10,000 clients.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use switchyard_client::{Client, ClientEvent, ClientOptions};
use switchyard_tests::{
    metric_value, raise_fd_limit, wait_status, Crowd, GatewayProcess, Publisher, RedisServer,
    ServiceProxy, STEP,
};

const TOPICS: [&str; 3] = ["crash.alpha", "crash.beta", "crash.gamma"];
const CLIENTS: usize = 3_000;
/// Each gateway's accept rate and burst: a survivor takes ~500 of the dead
/// pod's 1,000 clients, more than the rate admits within the 2 s abnormal
/// window, so the storm is shed and paced rather than admitted at once.
const RATE: u32 = 100;
const BURST: u32 = 50;
const LONG: Duration = Duration::from_secs(90);

/// `switchyard_connections_opened_total` of each gateway, sampled every
/// 100 ms until stopped: (seconds since the start, value) per gateway.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Vec<(f64, f64)>>>,
}

impl Sampler {
    fn start(gateways: Vec<SocketAddr>) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut samples = vec![Vec::new(); gateways.len()];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                for (gateway, series) in gateways.iter().zip(samples.iter_mut()) {
                    // The scrape is never shed, so it samples the storm itself.
                    let at = started.elapsed().as_secs_f64();
                    let (status, text) =
                        switchyard_tests::http_request(*gateway, "GET", "/metrics", None)
                            .expect("scrape");
                    assert_eq!(status, 200);
                    series.push((
                        at,
                        metric_value(&text, "switchyard_connections_opened_total"),
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        Sampler { stop, task }
    }

    async fn finish(self) -> Vec<Vec<(f64, f64)>> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("sampler")
    }
}

/// The most connections opened within any second of `samples`, and whether
/// every stretch of at most a second stayed within the token bucket's
/// bound (`burst` + `rate` × its length, plus one sampling interval).
fn within_bound(samples: &[(f64, f64)]) -> (f64, Option<String>) {
    let mut peak: f64 = 0.0;
    for (i, &(t0, c0)) in samples.iter().enumerate() {
        for &(t1, c1) in &samples[i + 1..] {
            if t1 - t0 > 1.0 {
                break;
            }
            let opened = c1 - c0;
            peak = peak.max(opened);
            let bound = f64::from(BURST) + f64::from(RATE) * (t1 - t0 + 0.1);
            if opened > bound {
                return (
                    peak,
                    Some(format!(
                        "{opened} opened in {:.2} s from {t0:.2} s",
                        t1 - t0
                    )),
                );
            }
        }
    }
    (peak, None)
}

fn gateway(redis: &RedisServer, name: &str) -> GatewayProcess {
    let settings = [
        "broker=redis".to_owned(),
        format!("redis.url={}", redis.url()),
        format!("server_id={name}"),
        format!("websocket.handshake_rate={RATE}"),
        format!("websocket.handshake_burst={BURST}"),
    ];
    let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
    let gw = GatewayProcess::start(&settings).expect("start gateway");
    assert!(wait_status(gw.public, "/readyz", 200, STEP), "{name} ready");
    gw
}

/// Three gateways on Redis behind a Service stand-in, 3,000 sessions each
/// subscribed to three topics, a publisher on the first gateway; the third
/// is killed with SIGKILL and the Service stops routing to it a second
/// later (its endpoints catching up). Every client of the dead gateway
/// reconnects to a survivor and gets every message exactly once, in order,
/// with its history recovered; no survivor accepts more than its rate
/// bound in any second and sheds the excess; the survivors' own clients
/// never notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_gateways_clients_come_back_paced_with_nothing_lost() {
    raise_fd_limit();
    let redis = RedisServer::start().expect("redis");
    let mut gateways: Vec<GatewayProcess> = ["gw-0", "gw-1", "gw-2"]
        .iter()
        .map(|name| gateway(&redis, name))
        .collect();
    let proxy = ServiceProxy::start(gateways.iter().map(|g| g.public).collect())
        .await
        .expect("proxy");
    // The default client: the abnormal window is what is under test.
    let crowd = Crowd::start(&proxy.ws_url(), CLIENTS, &TOPICS, |_| {});
    // The crowd's own cold start is a storm too: shed and paced the same way.
    crowd.wait_subscribed(LONG).await;
    let publishing = Publisher::start(gateways[0].admin, &TOPICS, Duration::from_millis(100));
    let survivors = vec![gateways[0].public, gateways[1].public];
    tokio::time::sleep(Duration::from_secs(2)).await;
    let shed_before: f64 = gateways[..2].iter().map(shed).sum();
    let sampler = Sampler::start(survivors.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Where each client stands at the kill: its gateway, and how many
    // connections it has had (the cold start shed some of them).
    let before: Vec<(String, usize)> = crowd
        .seen
        .iter()
        .map(|seen| {
            let seen = seen.lock().expect("seen");
            (
                seen.servers.last().cloned().unwrap_or_default(),
                seen.servers.len(),
            )
        })
        .collect();
    let killed_at = crowd_clock(&crowd);
    let mut dead = gateways.pop().expect("gw-2");
    dead.kill9();
    tokio::time::sleep(Duration::from_secs(1)).await;
    proxy.switch(survivors);

    // Every client of the dead gateway is back on a survivor.
    let orphans: Vec<usize> = (0..CLIENTS).filter(|&i| before[i].0 == "gw-2").collect();
    assert!(
        orphans.len() >= CLIENTS / 6,
        "{} clients on gw-2",
        orphans.len()
    );
    let deadline = Instant::now() + LONG;
    while orphans
        .iter()
        .any(|&i| crowd.seen[i].lock().expect("seen").servers.len() <= before[i].1)
    {
        assert!(
            Instant::now() < deadline,
            "clients of the dead gateway did not all come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let samples = sampler.finish().await;
    let last = publishing.finish().await;
    crowd.assert_complete(&last, LONG).await;

    let mut back: Vec<f64> = orphans
        .iter()
        .map(|&i| {
            let seen = crowd.seen[i].lock().expect("seen");
            seen.reconnected_at[before[i].1 - 1].as_secs_f64() - killed_at
        })
        .collect();
    back.sort_by(f64::total_cmp);
    let p99 = back[back.len() * 99 / 100 - 1];
    let shed_during: f64 = gateways.iter().map(shed).sum::<f64>() - shed_before;
    for (i, seen) in crowd.seen.iter().enumerate() {
        let seen = seen.lock().expect("seen");
        let (server, connections) = &before[i];
        // Each connection that ended is one disconnect, and refusals before
        // a welcome are one each too; the kill is the first after it.
        let since_kill = &seen.servers[connections - 1..];
        assert_eq!(
            seen.resyncs, 0,
            "client {i} resumed every topic from the backplane"
        );
        if server == "gw-2" {
            assert!(
                since_kill.len() == 2 && since_kill[1] != "gw-2",
                "client {i}: {:?}",
                seen.servers
            );
            assert!(
                seen.disconnects.contains(&1006),
                "client {i}: {:?}",
                seen.disconnects
            );
        } else {
            assert_eq!(
                since_kill,
                std::slice::from_ref(server),
                "client {i} of a survivor was disturbed: {:?}",
                seen.disconnects
            );
        }
    }
    let mut peaks = Vec::new();
    for (gateway, series) in ["gw-0", "gw-1"].iter().zip(&samples) {
        let (peak, over) = within_bound(series);
        assert!(
            over.is_none(),
            "{gateway} accepted beyond its bound: {over:?}"
        );
        peaks.push(peak);
    }
    assert!(
        shed_during > 0.0,
        "the storm exceeded the survivors' rate and was shed"
    );
    let connected: f64 = gateways
        .iter()
        .map(|g| g.metric("switchyard_connections").expect("metric"))
        .sum();
    assert_eq!(connected, CLIENTS as f64);
    eprintln!(
        "crash: {} clients of gw-2 back on the survivors, 99 % within {p99:.2} s of the kill \
         (last {:.2} s); survivors' peak opened per second {peaks:?} (bound {BURST} + {RATE}/s); \
         {shed_during} handshakes shed with 4003; {} messages per client per topic, none lost",
        orphans.len(),
        back.last().copied().unwrap_or_default(),
        last.values().max().copied().unwrap_or_default(),
    );
    crowd.stop();
}

/// Seconds on the crowd's clock (`Seen::reconnected_at`) now.
fn crowd_clock(crowd: &Crowd) -> f64 {
    crowd.started().elapsed().as_secs_f64()
}

fn shed(gw: &GatewayProcess) -> f64 {
    gw.metric(r#"switchyard_handshakes_rejected_total{reason="overloaded"}"#)
        .expect("metric")
}

/// With the memory broker the topic log lives in the gateway's process: a
/// client of a gateway that died resumes on another one, which has never
/// seen its epoch, and is told `recovered: false` (the application
/// resynchronises) rather than handed a stream with a silent gap; it then
/// gets what is published there.
#[tokio::test]
async fn with_the_memory_broker_a_crash_loses_the_log_and_clients_are_told() {
    let (survivor, mut dead) = (
        GatewayProcess::start(&["server_id=mem-0"]).expect("start"),
        GatewayProcess::start(&["server_id=mem-1"]).expect("start"),
    );
    let proxy = ServiceProxy::start(vec![dead.public]).await.expect("proxy");
    let mut options = ClientOptions::new(proxy.ws_url());
    options.backoff.abnormal_window = Duration::from_millis(200);
    let mut client = Client::start(options);
    client.subscribe("mem.t");
    until(&mut client, |e| matches!(e, ClientEvent::Resumed { .. })).await;
    for n in 1..=3 {
        dead.publish("mem.t", &format!("{n}")).expect("publish");
    }
    for _ in 1..=3 {
        until(&mut client, |e| matches!(e, ClientEvent::Message { .. })).await;
    }
    dead.kill9();
    proxy.switch(vec![survivor.public]);
    let disconnected = until(&mut client, |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    })
    .await;
    assert!(
        matches!(disconnected, ClientEvent::Disconnected { code: 1006, .. }),
        "{disconnected:?}"
    );
    let resumed = until(&mut client, |e| matches!(e, ClientEvent::Resumed { .. })).await;
    assert_eq!(
        resumed,
        ClientEvent::Resumed {
            topic: "mem.t".to_owned(),
            recovered: false
        }
    );
    assert_eq!(
        survivor
            .metric(r#"switchyard_resume_total{recovered="false"}"#)
            .expect("metric"),
        1.0
    );
    let at = survivor.publish("mem.t", "4").expect("publish");
    match until(&mut client, |e| matches!(e, ClientEvent::Message { .. })).await {
        ClientEvent::Message { position, data, .. } => {
            assert_eq!((position, data), (at, serde_json::json!(4)));
        }
        other => panic!("{other:?}"),
    }
}

/// The next event `wanted` accepts (others are skipped), within `STEP`.
async fn until(client: &mut Client, wanted: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
    tokio::time::timeout(STEP, async {
        loop {
            let event = client.next_event().await.expect("client running");
            if wanted(&event) {
                return event;
            }
        }
    })
    .await
    .expect("event in time")
}
