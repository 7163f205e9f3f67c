// Drives Debian's Chromium (playwright-core) through the demo page for
// tests/tests/browser.rs. The Rust test sends JSON commands on stdin; this
// script answers one JSON line on stdout per command.
//
//   node migrate.mjs PAGE_URL SCREENSHOT_PATH
//
// Commands: {"wait": {"topic": T, "n": N}} — wait until the page has received
// N messages on T, screenshot, print the page state; {"quit": true}.
import readline from "node:readline";
import { chromium } from "playwright-core";

const [pageUrl, screenshotPath] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
page.on("pageerror", (error) => console.error(`page error: ${error.message}`));

const state = () =>
  page.evaluate(() => ({
    received: window.demo.received,
    servers: window.demo.servers,
    migrations: window.demo.migrations,
    disconnects: window.demo.disconnects,
    retries: window.demo.retries,
    shown: {
      state: document.getElementById("state").textContent,
      server: document.getElementById("server").textContent,
      migrations: document.getElementById("migrations").textContent,
    },
  }));

try {
  await page.goto(pageUrl);
  await page.waitForFunction(() => window.demo && window.demo.subscribed.size >= 1, null, { timeout: 20000 });
  console.log(JSON.stringify({ ready: true, ...(await state()) }));
  const lines = readline.createInterface({ input: process.stdin });
  for await (const line of lines) {
    const command = JSON.parse(line);
    if (command.quit) break;
    if (command.wait) {
      await page.waitForFunction(
        ({ topic, n }) => (window.demo.received[topic] || []).length >= n,
        command.wait,
        { timeout: 30000 },
      );
      await page.screenshot({ path: screenshotPath, fullPage: true });
      console.log(JSON.stringify(await state()));
    }
  }
} catch (error) {
  console.log(JSON.stringify({ error: String(error) }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
process.exit(process.exitCode ?? 0);
