// Switchyard browser client: an ES module with no build step, served by the
// gateway at /switchyard.js. Same behaviour as the Rust client
// (client/src/session.rs):
//  - reconnects with exponential backoff and full jitter, or after the
//    gateway's retry_ms hint;
//  - acts on the close-code classes: 4000–4499 and transient standard codes
//    reconnect, 4001/4501 ask for credentials first, the rest are terminal;
//  - on `migrate`, opens the new connection first, resumes every topic from
//    its last position, then closes the old one with 1000 (make-before-break);
//  - drops duplicates by (epoch, offset), so the application sees one
//    continuous stream;
//  - holds publishes in a bounded outbox while disconnected;
//  - asks again for a subscribe the gateway refused as `unavailable`.
//
// Events (EventTarget; `event.detail` carries the data): connected,
// disconnected {code, reason, retryMs}, migrated {from, to},
// resumed {topic, recovered}, message {topic, epoch, offset, data},
// published {topic, position}, error {code, message}, stopped {code}.

/** What a close code tells the client to do. */
export function closeClass(code) {
  if (code === 4001 || code === 4501) return "reauthenticate";
  if ([1000, 1002, 1003, 1007, 1008, 1009, 1010].includes(code)) return "terminal";
  if (code >= 4500 && code <= 4999) return "terminal";
  return "reconnect";
}

/** Full-jitter backoff: uniform in [0, min(cap, base * 2^attempt)]. */
export function backoffDelay(attempt, baseMs, capMs, unit = Math.random()) {
  const ceiling = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 30));
  return Math.floor(ceiling * unit);
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
  constructor(url, { backoffBaseMs = 100, backoffCapMs = 10000, outboxLimit = 1000, getTicket = null } = {}) {
    super();
    this.url = url;
    this.getTicket = getTicket;
    this.backoffBaseMs = backoffBaseMs;
    this.backoffCapMs = backoffCapMs;
    this.outboxLimit = outboxLimit;
    /** topic -> last position delivered ({epoch, offset}) or null */
    this.cursors = new Map();
    this.outbox = [];
    this.socket = null;
    this.serverId = null;
    this.connectionId = null;
    this.attempt = 0;
    this.stopped = false;
    this.stats = { connections: 0, migrations: 0, duplicatesDropped: 0, disconnects: 0 };
  }

  /** Opens the session. */
  connect() {
    this.stopped = false;
    this.#open(false);
    return this;
  }

  subscribe(topic) {
    if (!this.cursors.has(topic)) this.cursors.set(topic, null);
    this.#sendOn(this.socket, { op: "subscribe", topic, ...this.#since(topic) });
  }

  unsubscribe(topic) {
    this.cursors.delete(topic);
    this.#sendOn(this.socket, { op: "unsubscribe", topic });
  }

  /** Publishes (held while disconnected); returns false when the outbox is full. */
  publish(topic, data) {
    const frame = { op: "publish", topic, data };
    if (this.#ready(this.socket)) {
      this.socket.send(JSON.stringify(frame));
      return true;
    }
    if (this.outbox.length >= this.outboxLimit) return false;
    this.outbox.push(frame);
    return true;
  }

  /** Ends the session with `code` (1000 by default). */
  close(code = 1000) {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    if (this.socket) this.socket.close(code);
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

  /**
   * Opens a connection; `migrating` keeps the current one until this one has
   * resumed. With `getTicket`, the socket opens once the ticket arrives; a
   * pending marker stands for it meanwhile so a second `migrate` starts nothing.
   */
  #open(migrating) {
    if (!this.getTicket) return this.#openAt(this.url, migrating);
    const pending = { pending: true };
    this.getTicket().then(
      (ticket) => {
        if (this.stopped) return;
        const socket = this.#openAt(withTicket(this.url, ticket), migrating);
        if (migrating && this.migration === pending) this.migration = socket;
      },
      (err) => {
        this.#emit("error", { code: "credential", message: String(err) });
        if (migrating) {
          // Stay on the current connection; its 4000 close takes the reconnect path.
          if (this.migration === pending) this.migration = null;
          return;
        }
        const retryMs = backoffDelay(this.attempt, this.backoffBaseMs, this.backoffCapMs);
        this.attempt += 1;
        this.retryTimer = setTimeout(() => {
          if (!this.stopped) this.#open(false);
        }, retryMs);
      },
    );
    return pending;
  }

  #openAt(url, migrating) {
    const socket = new WebSocket(url);
    socket.welcomed = false;
    socket.waiting = new Set();
    socket.onmessage = (event) => this.#onFrame(socket, event.data, migrating);
    socket.onclose = (event) => this.#onClose(socket, event);
    if (!migrating) this.socket = socket;
    return socket;
  }

  #onFrame(socket, text, migrating) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    switch (frame.op) {
      case "welcome": {
        socket.welcomed = true;
        socket.serverId = frame.server_id;
        socket.connectionId = frame.connection_id;
        this.stats.connections += 1;
        for (const topic of this.cursors.keys()) {
          socket.waiting.add(topic);
          socket.send(JSON.stringify({ op: "subscribe", topic, ...this.#since(topic) }));
        }
        if (!migrating) {
          this.attempt = 0;
          this.#becomeCurrent(socket);
          this.#emit("connected", { serverId: frame.server_id, connectionId: frame.connection_id });
        } else if (socket.waiting.size === 0) {
          this.#finishMigration(socket);
        }
        break;
      }
      case "subscribed": {
        const cursor = this.cursors.get(frame.topic);
        if (frame.topic !== undefined && this.cursors.has(frame.topic) && (!frame.recovered || !cursor)) {
          this.cursors.set(frame.topic, { ...frame.position });
        }
        this.#emit("resumed", { topic: frame.topic, recovered: frame.recovered });
        if (migrating && socket.waiting.delete(frame.topic) && socket.waiting.size === 0) {
          this.#finishMigration(socket);
        }
        break;
      }
      case "message": {
        if (!this.cursors.has(frame.topic)) return;
        if (!isAfter(this.cursors.get(frame.topic), frame.epoch, frame.offset)) {
          this.stats.duplicatesDropped += 1;
          return;
        }
        this.cursors.set(frame.topic, { epoch: frame.epoch, offset: frame.offset });
        this.#emit("message", { topic: frame.topic, epoch: frame.epoch, offset: frame.offset, data: frame.data });
        break;
      }
      case "migrate":
        if (socket === this.socket && !this.migration) this.migration = this.#open(true);
        break;
      case "heartbeat":
        socket.send(JSON.stringify({ op: "ping" }));
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
        break;
    }
  }

  #becomeCurrent(socket) {
    this.socket = socket;
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
    if (old) {
      old.retired = true;
      old.close(1000);
    }
    this.#emit("migrated", { from, to: socket.serverId });
  }

  #onClose(socket, event) {
    if (socket.retired) return; // the old side of a completed migration
    if (socket !== this.socket) {
      // A migration target that failed: stay on the current connection.
      if (socket === this.migration) this.migration = null;
      return;
    }
    if (this.migration && this.migration.welcomed) {
      // The old connection closed first (grace over): the new one takes over.
      this.#finishMigration(this.migration);
      return;
    }
    const reason = parseReason(event.reason);
    const kind = closeClass(event.code);
    this.stats.disconnects += 1;
    if (this.stopped || kind === "terminal") {
      this.#emit("stopped", { code: event.code });
      return;
    }
    const retryMs =
      typeof reason.retry_ms === "number"
        ? reason.retry_ms
        : backoffDelay(this.attempt, this.backoffBaseMs, this.backoffCapMs);
    this.attempt += 1;
    this.#emit("disconnected", { code: event.code, reason: reason.reason || "", retryMs, class: kind });
    this.retryTimer = setTimeout(() => {
      if (!this.stopped) this.#open(false);
    }, retryMs);
  }
}
