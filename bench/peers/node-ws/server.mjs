// Reference peer: a Node `ws` broadcast server written the way its README
// shows (clients.forEach(c => c.send(m))). Every connection receives every
// message published with POST /api/publish {"topic", "data"} on the admin
// port, as the data's JSON text.
//
//   node server.mjs <ws-port> <admin-port> [<tls-cert.pem> <tls-key.pem>]
//
// With a certificate and key the WebSocket port serves wss:// (node:https).
import fs from "node:fs";
import http from "node:http";
import https from "node:https";
import { WebSocketServer } from "ws";

const [wsPortArg, adminPortArg, certFile, keyFile] = process.argv.slice(2);
const [wsPort, adminPort] = [Number(wsPortArg), Number(adminPortArg)];
let wss;
if (certFile) {
  const server = https.createServer({ cert: fs.readFileSync(certFile), key: fs.readFileSync(keyFile) });
  wss = new WebSocketServer({ server, perMessageDeflate: false });
  server.listen(wsPort, "127.0.0.1");
} else {
  wss = new WebSocketServer({ host: "127.0.0.1", port: wsPort, perMessageDeflate: false });
}

const admin = http.createServer((req, res) => {
  if (req.method !== "POST" || req.url !== "/api/publish") {
    res.writeHead(404).end();
    return;
  }
  const chunks = [];
  req.on("data", (chunk) => chunks.push(chunk));
  req.on("end", () => {
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString("utf8"));
    } catch {
      res.writeHead(400).end();
      return;
    }
    const text = JSON.stringify(body.data);
    wss.clients.forEach((client) => client.send(text));
    res.writeHead(200, { "content-type": "application/json", "content-length": 2 }).end("{}");
  });
});
admin.keepAliveTimeout = 60_000;
admin.listen(adminPort, "127.0.0.1", () => {
  console.error(`node ws peer listening on ${wsPort} (admin ${adminPort})`);
});
