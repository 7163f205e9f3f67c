// Unit tables for the browser client's decisions (node --test); they mirror
// client/src/policy.rs so both clients behave the same.
import assert from "node:assert/strict";
import { test } from "node:test";
import { readFileSync } from "node:fs";
import { abnormalDelay, backoffDelay, closeClass, decide, isAfter, MAX_RETRY_MS, withTicket } from "../../client/js/switchyard.js";

/** client/behaviour.json: the close decisions both clients are tested against. */
const behaviour = JSON.parse(readFileSync(new URL("../../client/behaviour.json", import.meta.url)));

test("the behaviour table (client/behaviour.json)", () => {
  assert.equal(behaviour.max_retry_ms, MAX_RETRY_MS);
  assert.ok(behaviour.rows.length >= 30);
  const [backoff, abnormal] = [300, 1234];
  const waits = { backoff, abnormal };
  for (const row of behaviour.rows) {
    const expected = { action: row.action };
    if (row.wait !== undefined) expected.waitMs = waits[row.wait] ?? row.wait;
    assert.deepEqual(decide(row.code, row.phase, row.retry_ms, backoff, abnormal), expected, JSON.stringify(row));
  }
});

test("the first wait after an abnormal close spans its window", () => {
  // (attempt, unit, backoff) -> wait: the window on attempt 0, the backoff after.
  const table = [
    [0, 0, 50, 0], [0, 0.5, 50, 1000], [0, 1, 100, 2000], [1, 1, 200, 200], [6, 0.5, 2500, 2500],
  ];
  for (const [attempt, unit, backoff, expected] of table) {
    assert.equal(abnormalDelay(attempt, 2000, backoff, unit), expected, `attempt ${attempt} unit ${unit}`);
  }
});

test("close classes", () => {
  const table = [
    [1000, "terminal"], [1001, "reconnect"], [1006, "reconnect"], [1009, "terminal"],
    [4000, "reconnect"], [4001, "reauthenticate"], [4002, "reconnect"], [4003, "reconnect"],
    [4500, "terminal"], [4501, "reauthenticate"], [4502, "terminal"], [4503, "terminal"],
  ];
  for (const [code, expected] of table) assert.equal(closeClass(code), expected, `code ${code}`);
});

test("full-jitter backoff", () => {
  const table = [
    [0, 1, 100], [1, 1, 200], [3, 1, 800], [6, 1, 5000], [40, 1, 5000], [3, 0.5, 400], [3, 0, 0],
  ];
  for (const [attempt, unit, expected] of table) {
    assert.equal(backoffDelay(attempt, 100, 5000, unit), expected, `attempt ${attempt}`);
  }
});

test("duplicates and new epochs", () => {
  assert.equal(isAfter(null, 7, 1), true);
  assert.equal(isAfter({ epoch: 7, offset: 5 }, 7, 6), true);
  assert.equal(isAfter({ epoch: 7, offset: 5 }, 7, 5), false);
  assert.equal(isAfter({ epoch: 7, offset: 5 }, 7, 3), false);
  assert.equal(isAfter({ epoch: 7, offset: 5 }, 9, 1), true);
  // an epoch the log has moved past is stale, whatever its offset
  assert.equal(isAfter({ epoch: 7, offset: 5 }, 6, 9), false);
  assert.equal(isAfter({ epoch: 2 ** 53 - 1, offset: 0 }, 2 ** 53 - 2, 1), false);
});

test("withTicket adds the ticket to the query, encoded, before any fragment", () => {
  const table = [
    ["wss://gw.example.com/ws", "abc123", "wss://gw.example.com/ws?ticket=abc123"],
    ["ws://127.0.0.1:8080/ws?x=1", "abc", "ws://127.0.0.1:8080/ws?x=1&ticket=abc"],
    ["ws://h/ws#frag", "a b&c", "ws://h/ws?ticket=a%20b%26c"],
  ];
  for (const [url, ticket, expected] of table) {
    assert.equal(withTicket(url, ticket), expected, url);
  }
});
