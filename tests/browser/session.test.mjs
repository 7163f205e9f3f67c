// The browser client's session (client/js/switchyard.js) driven through a
// scripted WebSocket stand-in (node --test): each break issue 24 found is a
// sequence here — the old and the new connection of a migration closing,
// answering and failing in the orders the tables of client.test.mjs cannot
// reach.
import assert from "node:assert/strict";
import { afterEach, beforeEach, mock, test } from "node:test";

/** A WebSocket whose server side the test plays. */
class FakeSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;
  static all = [];

  constructor(url) {
    this.url = url;
    this.readyState = FakeSocket.CONNECTING;
    this.sent = [];
    this.closedWith = null;
    FakeSocket.all.push(this);
  }

  send(text) {
    if (this.readyState !== FakeSocket.OPEN) throw new Error("send on a socket that is not open");
    this.sent.push(JSON.parse(text));
  }

  /** The client closes: the close completes (onclose) on the next tick. */
  close(code = 1000) {
    if (this.readyState >= FakeSocket.CLOSING) return;
    this.readyState = FakeSocket.CLOSING;
    this.closedWith = code;
    setImmediate(() => this.#ended(code, ""));
  }

  #ended(code, reason) {
    if (this.readyState === FakeSocket.CLOSED) return;
    this.readyState = FakeSocket.CLOSED;
    this.onclose?.({ code, reason });
  }

  // The server's side.
  welcome(serverId, heartbeatMs = 25000) {
    this.readyState = FakeSocket.OPEN;
    this.onopen?.({});
    this.frame({ op: "welcome", connection_id: `${serverId}-c`, server_id: serverId, heartbeat_ms: heartbeatMs });
  }

  frame(value) {
    this.onmessage?.({ data: typeof value === "string" ? value : JSON.stringify(value) });
  }

  subscribed(topic, epoch, offset, recovered = true) {
    this.frame({ op: "subscribed", topic, position: { epoch, offset }, recovered });
  }

  message(topic, epoch, offset) {
    this.frame({ op: "message", topic, epoch, offset, data: { n: offset } });
  }

  serverClose(code, reason = "") {
    this.#ended(code, typeof reason === "string" ? reason : JSON.stringify(reason));
  }

  ops() {
    return this.sent.map((f) => `${f.op}${f.topic ? ` ${f.topic}` : ""}`);
  }
}

const { SwitchyardClient } = await import("../../client/js/switchyard.js");

let realWebSocket;
const clients = [];
let realRandom;
beforeEach(() => {
  realWebSocket = globalThis.WebSocket;
  globalThis.WebSocket = FakeSocket;
  FakeSocket.all = [];
  realRandom = Math.random;
  Math.random = () => 1; // backoff at its ceiling: delays are exact
  mock.timers.enable({ apis: ["setTimeout", "setInterval", "Date"] });
});
afterEach(() => {
  // A test's session must not act in the next one.
  for (const client of clients.splice(0)) client.close();
  mock.timers.reset();
  Math.random = realRandom;
  globalThis.WebSocket = realWebSocket;
});

/** A client and the application's view of it: every event, in order. */
function session(options = {}) {
  const client = new SwitchyardClient("ws://gw/ws", options);
  clients.push(client);
  const events = [];
  for (const type of ["connected", "disconnected", "migrated", "resumed", "message", "published", "error", "stopped"]) {
    client.addEventListener(type, (e) => events.push({ type, ...e.detail }));
  }
  return { client, events, types: () => events.map((e) => e.type) };
}

const tick = () => new Promise((resolve) => setImmediate(resolve));

/** Connected to gateway "a" with t1 (and t2) at epoch 7. */
function connected(topics = ["t1"], options = {}) {
  const s = session(options);
  s.client.connect();
  const a = FakeSocket.all[0];
  for (const topic of topics) s.client.subscribe(topic);
  a.welcome("a");
  for (const topic of topics) a.subscribed(topic, 7, 0);
  return { ...s, a };
}

/** …and migrating: `migrate` sent, the new connection "b" welcomed. */
function migrating(topics = ["t1", "t2"], options = {}) {
  const s = connected(topics, options);
  s.a.frame({ op: "migrate", grace_ms: 5000 });
  const b = FakeSocket.all[1];
  b.welcome("b");
  return { ...s, b };
}

test("break 1: a subscribed arriving after the old connection closed does not close the new one", async () => {
  const { client, events, a, b } = migrating();
  b.subscribed("t1", 7, 0);
  a.serverClose(4000, { retry_ms: 10 }); // the grace ran out on the gateway's side
  b.subscribed("t2", 7, 0); // late
  await tick();
  assert.equal(b.readyState, FakeSocket.OPEN, "the new connection stays open");
  assert.equal(b.closedWith, null);
  assert.equal(events.filter((e) => e.type === "migrated").length, 1);
  assert.equal(client.publish("t1", { x: 1 }), true);
  assert.deepEqual(b.ops().at(-1), "publish t1", "publishes go to the live connection");
  mock.timers.tick(60_000);
  assert.equal(FakeSocket.all.length, 2, "no third socket");
});

test("break 2: close() during a migration ends both connections and the session", async () => {
  const { client, events, a, b } = migrating();
  const before = events.length;
  client.close();
  assert.notEqual(a.readyState, FakeSocket.OPEN);
  assert.notEqual(b.readyState, FakeSocket.OPEN);
  b.subscribed("t1", 7, 0);
  b.subscribed("t2", 7, 0);
  b.message("t1", 7, 1);
  await tick();
  const after = events.slice(before).map((e) => e.type);
  assert.deepEqual(after, ["stopped"], "nothing but stopped after close()");
  assert.equal(client.publish("t1", {}), false, "publish after stopped reports failure");
  mock.timers.tick(60_000);
  assert.equal(FakeSocket.all.length, 2);
});

test("break 3: subscribe and unsubscribe during the overlap reach both connections", () => {
  const { client, a, b } = migrating();
  client.subscribe("t3");
  client.unsubscribe("t1");
  assert.ok(a.ops().includes("subscribe t3") && b.ops().includes("subscribe t3"), `${a.ops()} | ${b.ops()}`);
  assert.ok(a.ops().includes("unsubscribe t1") && b.ops().includes("unsubscribe t1"), `${a.ops()} | ${b.ops()}`);
  b.subscribed("t2", 7, 0);
  b.subscribed("t3", 7, 0);
  assert.equal(client.socket, b, "t1 is not waited for once unsubscribed");
});

test("break 4: a terminal close of the old connection during the overlap stops the session", async () => {
  const { events, a, b } = migrating();
  a.serverClose(4503, { reason: "revoked" });
  await tick();
  assert.deepEqual(events.at(-1), { type: "stopped", code: 4503 });
  assert.notEqual(b.readyState, FakeSocket.OPEN, "the new connection is closed too");
  mock.timers.tick(60_000);
  assert.equal(FakeSocket.all.length, 2);
});

test("break 6: backoff grows while the gateway accepts and drops, and resets after a healthy connection", () => {
  const { client: c, events: evs } = session();
  c.connect();
  const delays = [];
  for (let i = 0; i < 5; i += 1) {
    const socket = FakeSocket.all.at(-1);
    socket.welcome(`g${i}`);
    socket.serverClose(1011);
    delays.push(evs.filter((e) => e.type === "disconnected").at(-1).retryMs);
    mock.timers.tick(delays.at(-1));
  }
  assert.deepEqual(delays, [100, 200, 400, 800, 1600]);
  const healthy = FakeSocket.all.at(-1);
  healthy.welcome("ok");
  mock.timers.tick(20_000); // up past healthyMs, within two heartbeats
  healthy.serverClose(1011);
  assert.equal(evs.filter((e) => e.type === "disconnected").at(-1).retryMs, 100);
});

test("after a crash (1006) the first retry spans the abnormal window, then the backoff", () => {
  const { client: c, events: evs } = session({ healthyMs: 1000 });
  c.connect();
  const up = FakeSocket.all[0];
  up.welcome("a");
  mock.timers.tick(5000);
  up.serverClose(1006); // no close frame: the gateway died
  const first = evs.filter((e) => e.type === "disconnected").at(-1);
  assert.equal(first.retryMs, 2000, "the whole default window at unit 1, not the backoff's 100");
  mock.timers.tick(2000);
  const quick = FakeSocket.all.at(-1);
  quick.welcome("b");
  quick.serverClose(1006); // died again before it was healthy
  assert.equal(evs.filter((e) => e.type === "disconnected").at(-1).retryMs, 200, "attempt 1's backoff");
  const { client: narrow, events: narrowEvents } = session({ abnormalWindowMs: 300 });
  narrow.connect();
  const n = FakeSocket.all.at(-1);
  n.welcome("c");
  n.serverClose(1006);
  assert.equal(narrowEvents.filter((e) => e.type === "disconnected").at(-1).retryMs, 300);
});

test("break 7: a connection silent for two heartbeats is taken as dead", async () => {
  const { client, events } = session();
  client.connect();
  const a = FakeSocket.all[0];
  a.welcome("a", 1000);
  mock.timers.tick(1500);
  a.frame({ op: "heartbeat" });
  mock.timers.tick(1900);
  assert.equal(a.closedWith, null, "traffic within two heartbeats keeps it");
  mock.timers.tick(200);
  assert.notEqual(a.closedWith, null, "silent for two heartbeats: closed by the client");
  await tick();
  const gone = events.find((e) => e.type === "disconnected");
  assert.equal(gone?.code, 1006);
  mock.timers.tick(gone.retryMs);
  assert.equal(FakeSocket.all.length, 2, "and reconnected");
});

test("break 8: a resync on the new connection ends the old one's delivery of that topic", () => {
  const { client, events, a, b } = migrating(["t1"]);
  const start = events.length;
  a.message("t1", 7, 1);
  a.message("t1", 7, 2);
  b.subscribed("t1", 9, 40, false); // history lost: the stream restarts at (9, 40)
  a.message("t1", 7, 3); // stale: before the resync point
  b.message("t1", 9, 41);
  const seen = events.slice(start).filter((e) => e.type === "message" || e.type === "resumed");
  assert.deepEqual(
    seen.map((e) => (e.type === "message" ? `${e.epoch}:${e.offset}` : `resumed ${e.recovered}`)),
    ["7:1", "7:2", "resumed false", "9:41"],
  );
  void client;

  // The same when the resync point is an earlier offset of the same epoch.
  FakeSocket.all = [];
  const again = migrating(["t1"]);
  const from = again.events.length;
  again.a.message("t1", 7, 5);
  again.b.subscribed("t1", 7, 3, false);
  again.a.message("t1", 7, 6);
  again.b.message("t1", 7, 4);
  const order = again.events
    .slice(from)
    .filter((e) => e.type === "message" || e.type === "resumed")
    .map((e) => (e.type === "message" ? `${e.epoch}:${e.offset}` : `resumed ${e.recovered}`));
  assert.deepEqual(order, ["7:5", "resumed false", "7:4"]);
});

test("break 9: the smaller ones", async () => {
  // A null frame, an unknown op and a binary-looking frame are ignored.
  const { client, events, a } = connected(["t1"]);
  a.frame("null");
  a.frame("[1,2]");
  a.frame({ op: "from-the-future", x: 1 });
  a.frame({ op: "error", code: "new_kind", message: "m" });
  assert.equal(a.readyState, FakeSocket.OPEN);
  assert.deepEqual(events.at(-1), { type: "error", code: "new_kind", message: "m" });
  // `resumed` only for topics subscribed.
  a.subscribed("never", 7, 0);
  assert.equal(events.filter((e) => e.type === "resumed" && e.topic === "never").length, 0);
  // connect() twice opens one socket.
  client.connect();
  assert.equal(FakeSocket.all.length, 1);
  // retry_ms past setTimeout's range is clamped, not fired at once.
  a.serverClose(4000, { retry_ms: 2 ** 31 });
  const retry = events.at(-1).retryMs;
  assert.equal(retry, 3_600_000);
  mock.timers.tick(1000);
  assert.equal(FakeSocket.all.length, 1, "not reconnected at once");
  client.close();
  await tick();

  // A connection that never opens times out and is retried.
  FakeSocket.all = [];
  const slow = session({ connectTimeoutMs: 5000 });
  slow.client.connect();
  mock.timers.tick(5000);
  assert.notEqual(FakeSocket.all[0].closedWith, null, "given up after connectTimeoutMs");
  await tick();
  mock.timers.tick(200);
  assert.equal(FakeSocket.all.length, 2, "and retried");
  slow.client.close();

  // A ticket that never comes does not block later migrations.
  FakeSocket.all = [];
  let tickets = 0;
  const stuck = session({
    connectTimeoutMs: 5000,
    getTicket: () => {
      tickets += 1;
      return tickets === 1 ? Promise.resolve("first") : tickets === 2 ? new Promise(() => {}) : Promise.resolve("later");
    },
  });
  stuck.client.connect();
  await tick();
  const live = FakeSocket.all[0];
  live.welcome("a");
  live.frame({ op: "migrate", grace_ms: 5000 }); // ticket 2 never resolves
  mock.timers.tick(5000);
  await tick();
  live.frame({ op: "migrate", grace_ms: 5000 }); // ticket 3
  await tick();
  assert.equal(FakeSocket.all.length, 2, "the later migration opened its connection");
  stuck.client.close();
});

test("break 9: a retry pending when a migration completes does not open a third socket", async () => {
  const { client, a } = connected(["t1"]);
  a.frame({ op: "migrate", grace_ms: 5000 });
  const b = FakeSocket.all[1];
  a.serverClose(4000, { retry_ms: 1000 }); // before b is up: a retry is scheduled
  b.welcome("b");
  b.subscribed("t1", 7, 0);
  await tick();
  mock.timers.tick(5000);
  assert.equal(FakeSocket.all.length, 2, `sockets: ${FakeSocket.all.length}`);
  assert.equal(client.socket, b);
});
