// The browser client (client/js/switchyard.js) under Node, for the
// generated interleavings of tests/tests/client_interleavings.rs: the `ws`
// package stands in for the browser's WebSocket (a real socket to the test's
// scripted gateway). Prints every application event as one JSON line on
// stdout; closes the session when stdin ends.
//
//   node harness.mjs URL TOPIC[,TOPIC…]
import WebSocket from "../../bench/peers/node-ws/node_modules/ws/wrapper.mjs";
import { SwitchyardClient } from "../../client/js/switchyard.js";

globalThis.WebSocket = WebSocket;
const [url, topics] = process.argv.slice(2);
let tickets = 0;
const client = new SwitchyardClient(url, {
  backoffBaseMs: 100,
  backoffCapMs: 5000,
  connectTimeoutMs: 5000,
  getTicket: async () => {
    tickets += 1;
    return `ticket${tickets}`;
  },
});
const started = Date.now();
for (const type of ["connected", "disconnected", "migrated", "resumed", "message", "published", "error", "stopped"]) {
  client.addEventListener(type, (event) => {
    process.stdout.write(`${JSON.stringify({ type, t: Date.now() - started, ...event.detail })}\n`);
  });
}
for (const topic of topics.split(",")) client.subscribe(topic);
client.connect();
process.stdin.resume();
process.stdin.on("end", () => {
  client.close();
  setTimeout(() => process.exit(0), 100);
});
