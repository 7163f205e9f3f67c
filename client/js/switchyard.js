// Switchyard browser client: an ES module with no build step, served by the
// gateway at /switchyard.js. Same behaviour as the Rust client
// (client/src/session.rs), the obligations of docs/protocol.md:
//  - reconnects with exponential backoff and full jitter, or after the
//    gateway's retry_ms hint (clamped to an hour); the backoff starts over
//    only after a connection stayed up `healthyMs`, so a gateway that
//    accepts and drops is not hammered; the first wait after an abnormal
//    close (1006, a crashed gateway) spans `abnormalWindowMs` (2 s), so its
//    clients do not all come back to the survivors at once;
//  - acts on the close-code classes, before or after `welcome`, on the
//    current connection or on either side of a migration: 4000–4499 and
//    transient standard codes reconnect, 4001/4501 ask for credentials
//    first, the rest (e.g. 4503 revoked) end the session;
//  - on `migrate`, opens the new connection first, resumes every topic from
//    its last position, then closes the old one with 1000 (make-before-break);
//    subscribes and unsubscribes reach both sides of the overlap, and a topic
//    the new side resynchronised (`recovered: false`) is no longer taken
//    from the old one;
//  - drops duplicates by (epoch, offset), so the application sees one
//    continuous stream;
//  - takes a connection silent for two heartbeats, or not welcomed within
//    `connectTimeoutMs`, as dead;
//  - holds publishes in a bounded outbox while disconnected (at most once:
//    a publish sent on a connection that then drops may be lost);
//  - asks again for a subscribe the gateway refused as `unavailable`;
//  - ignores frames it does not know (forward-compatible).
//
// Events (EventTarget; `event.detail` carries the data): connected,
// disconnected {code, reason, retryMs}, migrated {from, to},
// resumed {topic, recovered}, message {topic, epoch, offset, data},
// published {topic, position}, error {code, message}, stopped {code}.

/** The longest wait a `retry_ms` hint can ask for (setTimeout's range ends at 2^31 ms). */
export const MAX_RETRY_MS = 3_600_000;

/** A hint as a wait, at most MAX_RETRY_MS; `null` when there is none (not a non-negative integer). */
export function retryHint(value) {
  if (!Number.isSafeInteger(value) || value < 0) {
    return Number.isFinite(value) && value > Number.MAX_SAFE_INTEGER ? MAX_RETRY_MS : null;
  }
  return Math.min(value, MAX_RETRY_MS);
}

/** What a close code tells the client to do. */
export function closeClass(code) {
  if (code === 4001 || code === 4501) return "reauthenticate";
  if ([1000, 1002, 1003, 1007, 1008, 1009, 1010].includes(code)) return "terminal";
  if (code >= 4500 && code <= 4999) return "terminal";
  return "reconnect";
}

/**
 * What to do about a close (client/behaviour.json, which the Rust client is
 * tested against too): `phase` is where the connection stood — connecting,
 * open, overlap_old (the session's connection while a migration's new one
 * is welcomed), overlap_new (that new one). Returns {action, waitMs}:
 * reconnect / reauthenticate after the hint or the backoff, stop, take_over
 * (the new connection becomes the session's), stay (on the old one).
 */
export function decide(code, phase, retryMs, backoffMs, abnormalMs = backoffMs) {
  const kind = closeClass(code);
  if (kind === "terminal") return { action: "stop" };
  if (phase === "overlap_old") return { action: "take_over" };
  if (phase === "overlap_new") return { action: "stay" };
  const hint = retryHint(retryMs);
  const wait = code === 1006 && phase === "open" ? abnormalMs : backoffMs;
  return { action: kind, waitMs: hint ?? wait };
}

/** Full-jitter backoff: uniform in [0, min(cap, base * 2^attempt)]. */
export function backoffDelay(attempt, baseMs, capMs, unit = Math.random()) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(ceiling * unit);
}

/**
 * The wait after an abnormal close (1006: no close frame, no hint — a
 * crashed gateway) of the session's connection: uniform over `windowMs` on
 * the first attempt after a connection that stayed up, since every client
 * of a crashed gateway sees it at the same instant; the backoff on later
 * attempts.
 */
export function abnormalDelay(attempt, windowMs, backoffMs, unit = Math.random()) {
  return attempt === 0 ? Math.floor(windowMs * unit) : backoffMs;
}

/**
 * Whether a message at (epoch, offset) comes after the cursor: a later offset
 * of the same epoch or any offset of a later one. Epochs are ordered (below
 * 2^53, exact as numbers); a message of an earlier epoch is stale.
 */
export function isAfter(cursor, epoch, offset) {
  return !cursor || epoch > cursor.epoch || (epoch === cursor.epoch && offset > cursor.offset);
}

function parseReason(reason) {
  try {
    const parsed = JSON.parse(reason);
    return typeof parsed === "object" && parsed !== null ? parsed : {};
  } catch {
    return reason ? { reason } : {};
  }
}

/** `url` with `?ticket=` (or `&ticket=`) added, the ticket URL-encoded. */
export function withTicket(url, ticket) {
  const hashAt = url.indexOf("#");
  const base = hashAt === -1 ? url : url.slice(0, hashAt);
  const separator = base.includes("?") ? "&" : "?";
  return `${base}${separator}ticket=${encodeURIComponent(ticket)}`;
}

export class SwitchyardClient extends EventTarget {
  /**
   * `getTicket`: optional async function returning a single-use ticket from
   * your backend (which mints it with the gateway's POST /api/tickets); it is
   * called before every connection, so reconnects and migrations present a
   * fresh one. Without it the browser's cookies authenticate the handshake.
   */
  constructor(
    url,
    {
      backoffBaseMs = 100,
      backoffCapMs = 10000,
      outboxLimit = 1000,
      getTicket = null,
      connectTimeoutMs = 10000,
      healthyMs = 10000,
      abnormalWindowMs = 2000,
    } = {},
  ) {
    super();
    this.url = url;
    this.getTicket = getTicket;
    this.backoffBaseMs = backoffBaseMs;
    this.backoffCapMs = backoffCapMs;
    this.outboxLimit = outboxLimit;
    this.connectTimeoutMs = connectTimeoutMs;
    this.healthyMs = healthyMs;
    this.abnormalWindowMs = abnormalWindowMs;
    /** topic -> last position delivered ({epoch, offset}) or null */
    this.cursors = new Map();
    this.outbox = [];
    /** The connection the session runs on (or is opening); null while waiting to retry. */
    this.socket = null;
    /** A migration's new connection (or a marker while its ticket comes). */
    this.migration = null;
    this.retryTimer = null;
    this.serverId = null;
    this.connectionId = null;
    this.attempt = 0;
    this.running = false;
    this.stopped = false;
    this.stats = { connections: 0, migrations: 0, duplicatesDropped: 0, disconnects: 0 };
  }

  /** Opens the session (once: a running session is left alone). */
  connect() {
    if (this.running) return this;
    this.running = true;
    this.stopped = false;
    this.#open(false);
    return this;
  }

  subscribe(topic) {
    if (!this.cursors.has(topic)) this.cursors.set(topic, null);
    const frame = { op: "subscribe", topic, ...this.#since(topic) };
    this.#sendOn(this.socket, frame);
    const next = this.#migrationSocket();
    if (next && next.welcomed) {
      next.waiting.add(topic);
      this.#sendOn(next, frame);
    }
  }

  unsubscribe(topic) {
    this.cursors.delete(topic);
    this.#sendOn(this.socket, { op: "unsubscribe", topic });
    const next = this.#migrationSocket();
    if (next && next.welcomed) {
      this.#sendOn(next, { op: "unsubscribe", topic });
      if (next.waiting.delete(topic) && next.waiting.size === 0) this.#finishMigration(next);
    }
  }

  /**
   * Publishes (held while disconnected). Returns false when the outbox is
   * full or the session has stopped. At most once: a publish written to a
   * connection that then drops may be lost; `published` confirms it.
   */
  publish(topic, data) {
    if (this.stopped) return false;
    const frame = { op: "publish", topic, data };
    if (this.#ready(this.socket)) {
      this.socket.send(JSON.stringify(frame));
      return true;
    }
    if (this.outbox.length >= this.outboxLimit) return false;
    this.outbox.push(frame);
    return true;
  }

  /** Ends the session with `code` (1000 by default): every connection closes, `stopped` follows. */
  close(code = 1000) {
    if (this.stopped) return;
    this.#stop(code, code);
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #since(topic) {
    const cursor = this.cursors.get(topic);
    return cursor ? { since: { epoch: cursor.epoch, offset: cursor.offset } } : {};
  }

  #ready(socket) {
    return socket && socket.readyState === WebSocket.OPEN && socket.welcomed;
  }

  #sendOn(socket, frame) {
    if (this.#ready(socket)) socket.send(JSON.stringify(frame));
  }

  /** The migration's new socket, once it exists (not the ticket marker). */
  #migrationSocket() {
    return this.migration && !this.migration.pending ? this.migration : null;
  }

  /** Ends the session: timers cleared, both connections closed, `stopped {code}` once. */
  #stop(eventCode, closeCode = 1000) {
    this.stopped = true;
    this.running = false;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    for (const socket of [this.socket, this.#migrationSocket()]) {
      if (!socket) continue;
      this.#quiet(socket);
      socket.retired = true;
      if (socket.readyState <= WebSocket.OPEN) socket.close(closeCode);
    }
    this.socket = null;
    this.migration = null;
    this.#emit("stopped", { code: eventCode });
  }

  #quiet(socket) {
    clearTimeout(socket.connectTimer);
    clearTimeout(socket.silenceTimer);
  }

  /**
   * Gives up on a socket locally (no welcome in time, or silent too long):
   * it counts as closed with 1006 now — a close handshake with a peer that
   * is gone would wait for its own timeout first.
   */
  #abandon(socket) {
    if (socket.readyState > WebSocket.OPEN || socket.abandoned) return;
    socket.abandoned = true;
    socket.onmessage = null;
    socket.onclose = null;
    socket.close(1000);
    this.#onClose(socket, { code: 1006, reason: "" });
  }

  /** Two heartbeats of silence and the connection is dead (half-open TCP, a sleeping laptop). */
  #heard(socket) {
    if (!socket.heartbeatMs) return;
    clearTimeout(socket.silenceTimer);
    socket.silenceTimer = setTimeout(() => this.#abandon(socket), 2 * socket.heartbeatMs);
  }

  #scheduleRetry(retryMs) {
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (!this.stopped && !this.socket) this.#open(false);
    }, retryMs);
  }

  #nextBackoff() {
    const delay = backoffDelay(this.attempt, this.backoffBaseMs, this.backoffCapMs);
    this.attempt += 1;
    return delay;
  }

  /**
   * Opens a connection; `migrating` keeps the current one until this one has
   * resumed. With `getTicket`, the socket opens once the ticket arrives; a
   * pending marker stands for it meanwhile so a second `migrate` starts
   * nothing — for at most `connectTimeoutMs`.
   */
  #open(migrating) {
    if (!this.getTicket) return this.#openAt(this.url, migrating);
    const pending = { pending: true };
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error("no ticket within connectTimeoutMs")), this.connectTimeoutMs);
    });
    Promise.race([Promise.resolve().then(() => this.getTicket()), timeout]).then(
      (ticket) => {
        clearTimeout(timer);
        if (this.stopped) return;
        if (migrating) {
          if (this.migration !== pending) return; // given up on meanwhile
          this.migration = this.#openAt(withTicket(this.url, ticket), true);
        } else if (!this.socket) {
          this.#openAt(withTicket(this.url, ticket), false);
        }
      },
      (err) => {
        clearTimeout(timer);
        if (this.stopped) return;
        this.#emit("error", { code: "credential", message: String(err) });
        if (migrating) {
          // Stay on the current connection; its 4000 close takes the reconnect path.
          if (this.migration === pending) this.migration = null;
          return;
        }
        this.#scheduleRetry(this.#nextBackoff());
      },
    );
    return pending;
  }

  #openAt(url, migrating) {
    const socket = new WebSocket(url);
    socket.welcomed = false;
    socket.waiting = new Set();
    socket.resynced = new Set();
    socket.onmessage = (event) => this.#onFrame(socket, event.data);
    socket.onclose = (event) => this.#onClose(socket, event);
    // An error is always followed by a close, which is what is acted on
    // (and an error no one listens to would throw under Node's `ws`).
    socket.onerror = () => {};
    socket.connectTimer = setTimeout(() => {
      if (!socket.welcomed) this.#abandon(socket);
    }, this.connectTimeoutMs);
    if (!migrating) this.socket = socket;
    return socket;
  }

  #onFrame(socket, text) {
    if (this.stopped || socket.retired) return;
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (typeof frame !== "object" || frame === null || Array.isArray(frame)) return;
    this.#heard(socket);
    const isNew = socket === this.migration;
    switch (frame.op) {
      case "welcome": {
        if (socket.welcomed) break;
        socket.welcomed = true;
        socket.welcomedAt = Date.now();
        clearTimeout(socket.connectTimer);
        socket.serverId = frame.server_id;
        socket.connectionId = frame.connection_id;
        socket.heartbeatMs = Number.isFinite(frame.heartbeat_ms) && frame.heartbeat_ms > 0 ? frame.heartbeat_ms : 0;
        this.#heard(socket);
        this.stats.connections += 1;
        for (const topic of this.cursors.keys()) {
          socket.waiting.add(topic);
          socket.send(JSON.stringify({ op: "subscribe", topic, ...this.#since(topic) }));
        }
        if (!isNew) {
          this.#becomeCurrent(socket);
          this.#emit("connected", { serverId: frame.server_id, connectionId: frame.connection_id });
        } else if (socket.waiting.size === 0) {
          this.#finishMigration(socket);
        }
        break;
      }
      case "subscribed": {
        if (typeof frame.topic !== "string" || !this.cursors.has(frame.topic)) break;
        const cursor = this.cursors.get(frame.topic);
        const position = frame.position;
        if (position && (!frame.recovered || !cursor)) {
          this.cursors.set(frame.topic, { epoch: position.epoch, offset: position.offset });
        }
        // From a resync on the new side on, the old side's stream of the
        // topic is the one the application was told to forget.
        if (isNew && !frame.recovered) socket.resynced.add(frame.topic);
        this.#emit("resumed", { topic: frame.topic, recovered: frame.recovered });
        if (isNew && socket.waiting.delete(frame.topic) && socket.waiting.size === 0) {
          this.#finishMigration(socket);
        }
        break;
      }
      case "message": {
        if (!this.cursors.has(frame.topic)) break;
        const next = this.#migrationSocket();
        if (socket === this.socket && next && next.resynced.has(frame.topic)) {
          this.stats.duplicatesDropped += 1;
          break;
        }
        if (!isAfter(this.cursors.get(frame.topic), frame.epoch, frame.offset)) {
          this.stats.duplicatesDropped += 1;
          break;
        }
        this.cursors.set(frame.topic, { epoch: frame.epoch, offset: frame.offset });
        this.#emit("message", { topic: frame.topic, epoch: frame.epoch, offset: frame.offset, data: frame.data });
        break;
      }
      case "migrate":
        if (socket === this.socket && !this.migration) this.migration = this.#open(true);
        break;
      case "heartbeat":
        this.#sendOn(socket, { op: "ping" });
        break;
      case "published":
        this.#emit("published", { topic: frame.topic, position: frame.position });
        break;
      case "error":
        if (frame.code === "unavailable" && this.cursors.has(frame.topic)) {
          // The gateway's backplane is reconnecting: ask again shortly.
          setTimeout(() => {
            if (this.cursors.has(frame.topic)) {
              this.#sendOn(socket, { op: "subscribe", topic: frame.topic, ...this.#since(frame.topic) });
            }
          }, 100 + Math.floor(Math.random() * 500));
          break;
        }
        this.#emit("error", { code: frame.code, message: frame.message });
        break;
      default:
        // A frame of a later protocol version: not ours to act on.
        break;
    }
  }

  #becomeCurrent(socket) {
    this.socket = socket;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this.serverId = socket.serverId;
    this.connectionId = socket.connectionId;
    for (const frame of this.outbox.splice(0)) socket.send(JSON.stringify(frame));
  }

  #finishMigration(socket) {
    const old = this.socket;
    const from = old ? old.serverId : null;
    this.migration = null;
    this.#becomeCurrent(socket);
    this.stats.migrations += 1;
    if (old && old !== socket) {
      old.retired = true;
      this.#quiet(old);
      if (old.readyState <= WebSocket.OPEN) old.close(1000);
    }
    this.#emit("migrated", { from, to: socket.serverId });
  }

  #onClose(socket, event) {
    this.#quiet(socket);
    if (this.stopped || socket.retired) return;
    if (socket !== this.socket && socket !== this.migration) return;
    const code = event.code;
    const reason = parseReason(event.reason);
    const next = this.#migrationSocket();
    const phase =
      socket === this.migration
        ? "overlap_new"
        : next && next.welcomed
          ? "overlap_old"
          : socket.welcomed
            ? "open"
            : "connecting";
    // The backoff starts over only after a connection that stayed up.
    if (socket.welcomedAt !== undefined && Date.now() - socket.welcomedAt >= this.healthyMs) this.attempt = 0;
    const backoffMs = backoffDelay(this.attempt, this.backoffBaseMs, this.backoffCapMs);
    const abnormalMs = abnormalDelay(this.attempt, this.abnormalWindowMs, backoffMs);
    const decision = decide(code, phase, reason.retry_ms, backoffMs, abnormalMs);
    switch (decision.action) {
      case "stop":
        // Revoked, refused, or told to stop, on either side of a migration:
        // the session ends (another gateway would not make it valid).
        this.stats.disconnects += 1;
        this.#stop(code);
        return;
      case "stay":
        // A migration target that failed: stay on the current connection.
        this.migration = null;
        return;
      case "take_over":
        // The old connection closed first (grace over): the new one takes over.
        this.#finishMigration(next);
        return;
      default:
        break;
    }
    this.socket = null;
    this.stats.disconnects += 1;
    this.attempt += 1;
    const retryMs = decision.waitMs;
    this.#emit("disconnected", { code, reason: reason.reason || "", retryMs, class: decision.action });
    // A migration still opening may finish first; then this retry is cancelled.
    this.#scheduleRetry(retryMs);
  }
}
