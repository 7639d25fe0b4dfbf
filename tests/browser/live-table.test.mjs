// An answer is shown rendered while it streams: moss in front of an OpenAI-compatible upstream
// (a small server here that streams a known Markdown table and holds its last piece until the
// test lets it go), driven in Debian's chromium. The table must be a table while the answer is
// still coming.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { mkdtempSync, mkdirSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { root, serve, launch } from "./moss.mjs";

const shots = join(root, "target", "ui-screenshots");
const dir = mkdtempSync(join(tmpdir(), "moss-live-"));
const TABLE = "Here they are:\n\n| Planet | Distance |\n|---|---|\n| Mercury | 0.39 AU |\n| Venus | 0.72 AU |\n| Earth | 1 AU |\n\n";
const LAST = "All three are rocky.";
let upstream, server, browser, page, base, invite, letGo;
const lastPiece = new Promise((ok) => { letGo = ok; });

function chunk(res, body) {
  res.write(`data: ${JSON.stringify(body)}\n\n`);
}

before(async () => {
  mkdirSync(shots, { recursive: true });
  upstream = createServer((req, res) => {
    if (req.url.endsWith("/models")) {
      res.writeHead(200, { "content-type": "application/json" });
      return res.end(JSON.stringify({ object: "list", data: [{ id: "table-model", object: "model" }] }));
    }
    req.resume();
    req.on("end", async () => {
      res.writeHead(200, { "content-type": "text/event-stream" });
      const piece = (content) => ({ id: "c", object: "chat.completion.chunk", choices: [{ index: 0, delta: { content }, finish_reason: null }] });
      // The table in small pieces, as a model writes it; then the last piece only when let go.
      for (const part of TABLE.match(/[\s\S]{1,6}/g)) chunk(res, piece(part));
      await lastPiece;
      chunk(res, piece(LAST));
      chunk(res, { id: "c", object: "chat.completion.chunk", choices: [{ index: 0, delta: {}, finish_reason: "stop" }] });
      res.end("data: [DONE]\n\n");
    });
  });
  await new Promise((ok) => upstream.listen(0, "127.0.0.1", ok));
  const env = {
    ...process.env,
    MOSS_DATABASE__DATA_DIR: join(dir, "data"),
    MOSS_ENGINE__BACKEND: "openai",
    MOSS_ENGINE__UPSTREAM__URLS: `["http://127.0.0.1:${upstream.address().port}/v1"]`,
    MOSS_ENGINE__UPSTREAM__MODEL: "table-model",
    RUST_LOG: "warn",
  };
  ({ server, base, invite } = await serve([], env));
  browser = await launch();
  page = await (await browser.newContext({ locale: "en-US", viewport: { width: 1200, height: 800 } })).newPage();
  page.on("pageerror", (e) => console.error("page error:", e.message));
});

after(async () => {
  letGo();
  await browser?.close();
  server?.kill("SIGTERM");
  upstream?.close();
  rmSync(dir, { recursive: true, force: true });
});

test("a Markdown table is a table before the answer has finished", async () => {
  await page.goto(invite);
  await page.fill("[data-form=register] [name=email]", "reader@example.com");
  await page.fill("[data-form=register] [name=password]", "a long enough password");
  await page.click("[data-form=register] button[type=submit]");
  await page.waitForSelector("#composer");
  await page.fill("#prompt", "Three planets and their distance from the sun, as a table");
  await page.click("#send");
  // Still streaming (the upstream holds its last piece), already a rendered table.
  await page.waitForSelector(".message.assistant.streaming table td:has-text('Earth')", { timeout: 15000 });
  assert.equal(await page.locator(".message.assistant.streaming table tr").count(), 4);
  assert.equal(await page.locator(".message.assistant.streaming .body").evaluate((b) => b.textContent.includes("|---|")), false, "no raw Markdown");
  await page.screenshot({ path: join(shots, "13-live-table.png") });
  const box = await page.locator(".message.assistant.streaming table").boundingBox();
  letGo();
  await page.waitForSelector(".message.assistant .tools .regenerate", { timeout: 15000 });
  assert.match(await page.textContent(".message.assistant .body"), /All three are rocky/);
  // Measured in the page, in one go (the finished answer may be re-drawn as stored meanwhile).
  const after = await page.evaluate(() => {
    const r = document.querySelector(".message.assistant:not(.streaming) table").getBoundingClientRect();
    return [r.x, r.y, r.width];
  });
  assert.deepEqual(after, [box.x, box.y, box.width], "the table does not jump at the end");
});
