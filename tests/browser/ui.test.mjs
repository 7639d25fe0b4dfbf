// The whole journey in a real browser (Debian's chromium, driven by playwright-core) against the
// real moss binary with a tiny model: waitlist, invite registration, streaming, stop, regenerate,
// rendering, XSS, feedback, consent, admin, Chinese, phone screen. Screenshots go to
// target/ui-screenshots/ (a chosen few are copied into docs/screenshots/).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { root, bin, serve, launch } from "./moss.mjs";

const shots = join(root, "target", "ui-screenshots");
const dir = mkdtempSync(join(tmpdir(), "moss-ui-"));
const env = {
  ...process.env,
  MOSS_DATABASE__DATA_DIR: join(dir, "data"),
  MOSS_ENGINE__DEVICE: "cpu",
  MOSS_ENGINE__TOKEN_DELAY_MS: "30",
  MOSS_ENGINE__MAX_TOKENS: "80",
  MOSS_ENGINE__SYSTEM_PROMPT: "You are moss.",
  MOSS_CHAT__MAX_MESSAGE_CHARS: "400",
  MOSS_DASHBOARD__WRITE_SECS: "1",
  RUST_LOG: "warn",
  // one browser clicking through everything in seconds: widen the general bucket (its own tests cover it)
  MOSS_LIMITS__API__PER_MINUTE: "6000",
  MOSS_LIMITS__API__BURST: "1000",
};
let server, browser, page, base, adminInvite;

function moss(...args) {
  return execFileSync(bin, args, { env, encoding: "utf8" });
}

async function shot(name) {
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: false });
}

// axe-core from npm, run in the page (evaluate is not subject to the page's CSP): no serious or
// critical accessibility violations.
const axeSource = readFileSync(join(import.meta.dirname, "node_modules", "axe-core", "axe.min.js"), "utf8");
async function accessible(where) {
  await page.evaluate(axeSource);
  const r = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  const bad = r.violations
    .filter((v) => v.impact === "serious" || v.impact === "critical")
    .map((v) => `${v.id}: ${v.nodes.slice(0, 3).map((n) => n.target.join(" ")).join(", ")}`);
  assert.deepEqual(bad, [], where);
}

before(async () => {
  mkdirSync(shots, { recursive: true });
  const model = join(dir, "tiny.gguf");
  moss("debug", "tiny-model", model);
  let invite;
  ({ server, base, invite } = await serve(["--model", model], env));
  adminInvite = invite;
  browser = await launch();
  const context = await browser.newContext({ locale: "en-US", viewport: { width: 1200, height: 800 } });
  await context.grantPermissions(["clipboard-read", "clipboard-write"], { origin: base });
  page = await context.newPage();
  page.on("dialog", (d) => { page.__dialogs = (page.__dialogs || 0) + 1; d.accept(); });
  page.on("pageerror", (e) => console.error("page error:", e.message));
  page.on("console", (m) => { if (m.type() === "error") console.error("console:", m.text()); });
});

after(async () => {
  await browser?.close();
  server?.kill("SIGTERM");
  rmSync(dir, { recursive: true, force: true });
});

async function api(method, path, body) {
  return page.evaluate(async ([m, p, b]) => {
    const r = await fetch(p, { method: m, headers: { "content-type": "application/json" }, body: b === undefined ? undefined : JSON.stringify(b) });
    return { status: r.status, body: await r.json().catch(() => null) };
  }, [method, path, body]);
}

test("someone without a code joins the waitlist", async () => {
  await page.goto(base);
  await page.fill("[data-form=waitlist] [name=email]", "waiting@example.com");
  await page.click("[data-form=waitlist] button[type=submit]");
  // No mail configured here: the place in line and a private status link, which works.
  await page.waitForSelector("[data-form=waitlist] .result:has-text('number 1 in line')");
  await shot("01-landing");
  const status = await page.getAttribute("[data-form=waitlist] .status-link", "href");
  await page.goto(status);
  assert.match(await page.textContent("main"), /number 1 in line/);
  await page.goto(base);
  await accessible("landing");
  // The first Tab stop on the chat page is checked later; here the other pages pass axe too.
  for (const path of ["/reset?token=nothing", "/waitlist/status?token=nothing", "/register"]) {
    await page.goto(base + path);
    await accessible(path);
  }
  await page.goto(base);
});

test("the invite link fills in the code and registers an account", async () => {
  await page.goto(adminInvite);
  const code = adminInvite.split("code=")[1];
  assert.equal(await page.inputValue("[data-form=register] [name=invite_code]"), code);
  await page.fill("[data-form=register] [name=email]", "admin@example.com");
  await page.fill("[data-form=register] [name=display_name]", "Ada");
  await page.fill("[data-form=register] [name=password]", "a long enough password");
  await page.click("[data-form=register] button[type=submit]");
  await page.waitForSelector("#composer");
  const me = await api("GET", "/api/me");
  assert.equal(me.body.user.email, "admin@example.com");
  assert.equal(me.body.user.role, "admin");
});

test("a message streams in token by token and ends with tools", async () => {
  await page.fill("#prompt", "hello world, what is the capital of france?");
  await page.keyboard.press("Enter");
  await page.waitForSelector(".message.assistant.streaming");
  const first = (await page.textContent(".message.assistant.streaming .body")).length;
  // The text grows while the answer is still streaming.
  await page.waitForFunction((n) => {
    const body = document.querySelector(".message.assistant.streaming .body");
    return body && body.textContent.length > n;
  }, first, { timeout: 10000 });
  await shot("02-streaming");
  await page.waitForSelector(".message.assistant .tools .regenerate", { timeout: 30000 });
  assert.equal(await page.locator(".message.assistant.streaming").count(), 0);
  assert.match(await page.textContent("#conversations"), /hello world/);
  assert.equal(await page.textContent("#conversations .group-label"), "Today", "grouped by date");
  await shot("03-answered");
  await accessible("chat");
});

test("Esc stops an answer too; a question looks the same after a reload", async () => {
  await page.fill("#prompt", "one line question");
  await page.click("#send");
  await page.waitForFunction(() => (document.querySelector(".message.assistant.streaming .body")?.textContent || "").length > 3);
  const sent = await page.locator(".message.user:has-text('one line question')").boundingBox();
  await page.keyboard.press("Escape");
  await page.waitForSelector(".message.assistant:last-child .cut-note", { timeout: 10000 });
  await page.reload();
  await page.waitForSelector(".message.user:has-text('one line question') .edit:not([disabled])");
  const stored = await page.locator(".message.user:has-text('one line question')").boundingBox();
  assert.equal(stored.height, sent.height, "no blank lines gained");
});

test("stop ends the answer and keeps what was written", async () => {
  await page.fill("#prompt", "tell me a long story");
  await page.click("#send");
  await page.waitForSelector(".message.assistant.streaming");
  await page.waitForFunction(() => (document.querySelector(".message.assistant.streaming .body")?.textContent || "").length > 3);
  await page.click("#stop");
  await page.waitForSelector(".message.assistant .cut-note", { timeout: 10000 });
  assert.match(await page.textContent(".message.assistant:last-child .cut-note"), /stopped/);
  const conv = await api("GET", "/api/conversations");
  const detail = await api("GET", `/api/conversations/${conv.body.conversations[0].id}`);
  const last = detail.body.messages.at(-1);
  assert.equal(last.finish_reason, "cancelled");
  assert.ok(last.content.length > 0);
});

test("regenerate replaces the last answer", async () => {
  const before = await page.getAttribute(".message.assistant:last-child", "data-id");
  await page.click(".message.assistant:last-child .regenerate");
  await page.waitForFunction((old) => {
    const last = document.querySelector(".message.assistant:last-child");
    return last && last.dataset.id && last.dataset.id !== old && last.querySelector(".tools");
  }, before, { timeout: 30000 });
  assert.equal(await page.locator(`.message[data-id="${before}"]`).count(), 0);
});

test("an answer is shown rendered while it streams", async () => {
  await page.fill("#prompt", "write a paragraph");
  await page.click("#send");
  // The server's rendering (a paragraph element) replaces the raw text before the end.
  await page.waitForSelector(".message.assistant.streaming .body p", { timeout: 10000 });
  await page.waitForSelector(".message.assistant .tools .regenerate", { timeout: 30000 });
});

test("a reload mid-answer finds the same answer still coming, and it is stored whole", async () => {
  await page.fill("#prompt", "a long answer please");
  await page.click("#send");
  await page.waitForFunction(() => (document.querySelector(".message.assistant.streaming .body")?.textContent || "").length > 3);
  const seen = (await page.textContent(".message.assistant.streaming .body")).length;
  assert.match(new URL(page.url()).pathname, /^\/c\/\d+$/, "the conversation has its address");
  const id = new URL(page.url()).pathname.split("/")[2];
  await page.reload();
  // The reloaded page follows the running answer from its start.
  await page.waitForSelector(".message.assistant.streaming");
  await page.waitForSelector(".message.assistant .tools .regenerate", { timeout: 30000 });
  const detail = await api("GET", `/api/conversations/${id}`);
  const last = detail.body.messages.at(-1);
  assert.notEqual(last.finish_reason, "cancelled", "the reload did not stop it");
  assert.ok(last.content.length >= seen, `${last.content.length} >= ${seen}`);
  assert.equal(await page.textContent(".message.assistant:last-child .body"), (await page.evaluate((h) => {
    const d = document.createElement("div"); d.innerHTML = h; return d.textContent;
  }, (await api("GET", `/api/conversations/${id}`)).body.messages.at(-1).html)));
});

test("a refused send keeps the text, with the reason next to it", async () => {
  await page.click("#new-chat");
  assert.equal(new URL(page.url()).pathname, "/");
  const before = (await api("GET", "/api/conversations")).body.conversations.length;
  const long = "x".repeat(401);
  await page.fill("#prompt", long);
  await page.click("#send");
  await page.waitForSelector("#chat-error:not([hidden])");
  assert.equal(await page.inputValue("#prompt"), long, `the text is still in the composer (${await page.textContent("#chat-error")})`);
  assert.equal(await page.locator(".message.user").count(), 0, "no question shown as sent");
  await page.waitForFunction(async (n) => {
    const r = await fetch("/api/conversations");
    return (await r.json()).conversations.length === n;
  }, before);
  // It survives a reload too.
  await page.reload();
  assert.equal(await page.inputValue("#prompt"), long);
  await page.fill("#prompt", "");
  await page.evaluate(() => sessionStorage.clear());
});

test("each conversation has an address; Back and Forward move between them", async () => {
  moss("debug", "seed-answer", "--email", "admin@example.com", "--question", "Second topic", "--answer", "Yes.");
  await page.reload();
  const convs = (await api("GET", "/api/conversations")).body.conversations;
  const [a, b] = [convs[0], convs[1]];
  await page.click(`#conversations li[data-id="${a.id}"] .conv-title`);
  await page.waitForURL(`**/c/${a.id}`);
  await page.click(`#conversations li[data-id="${b.id}"] .conv-title`);
  await page.waitForURL(`**/c/${b.id}`);
  await page.waitForFunction((t) => document.title.startsWith(t), b.title);
  await page.goBack();
  await page.waitForURL(`**/c/${a.id}`);
  await page.waitForFunction((t) => document.title.startsWith(t), a.title);
  await page.waitForSelector(`#conversations li.active[data-id="${a.id}"]`);
  await page.goForward();
  await page.waitForURL(`**/c/${b.id}`);
  await page.waitForSelector(`#conversations li.active[data-id="${b.id}"]`);
  // A favicon and a web-app manifest (installable on a phone).
  const manifest = await page.evaluate(async () => (await fetch(document.querySelector("link[rel=manifest]").href)).json());
  assert.equal(manifest.name, "moss");
  const icon = await page.evaluate(async () => (await fetch(document.querySelector("link[rel=icon]").href)).status);
  assert.equal(icon, 200);
});

test("scrolled up while an answer streams, the page stays where the reader is", async () => {
  moss("debug", "seed-answer", "--email", "admin@example.com", "--question", "Long one",
    "--answer", Array.from({ length: 60 }, (_, i) => `Line ${i} of a long earlier answer.`).join("\n\n"));
  await page.reload();
  await page.click("#conversations li:has-text('Long one') .conv-title");
  await page.waitForSelector(".message.assistant .body:has-text('Line 59')");
  await page.fill("#prompt", "and more");
  await page.click("#send");
  await page.waitForSelector(".message.assistant.streaming");
  await page.evaluate(() => { const m = document.getElementById("messages"); m.scrollTop = 0; m.dispatchEvent(new Event("scroll")); });
  const grown = (await page.textContent(".message.assistant.streaming .body")).length;
  await page.waitForFunction((n) => (document.querySelector(".message.assistant.streaming .body")?.textContent || "").length > n + 5, grown, { timeout: 10000 });
  assert.equal(await page.evaluate(() => document.getElementById("messages").scrollTop), 0, "not pulled down");
  assert.ok(await page.isVisible("#jump"), "a jump-to-latest button instead");
  await page.click("#jump");
  assert.ok(await page.evaluate(() => { const m = document.getElementById("messages"); return m.scrollHeight - m.scrollTop - m.clientHeight < 40; }));
  await page.waitForSelector(".message.assistant .tools .regenerate", { timeout: 30000 });
});

test("editing a question makes a second version, and ‹ › switch between versions", async () => {
  await page.click("#new-chat");
  await page.fill("#prompt", "first version");
  await page.click("#send");
  await page.waitForSelector(".message.user .edit", { timeout: 30000 });
  await page.click(".message.user .edit");
  await page.fill(".edit-form textarea", "second version");
  await page.click(".edit-form button[type=submit]");
  await page.waitForSelector(".message.user .branch-at:has-text('2 / 2')", { timeout: 30000 });
  assert.equal(await page.textContent(".message.user .body"), "second version");
  await page.click(".message.user .branch-prev");
  await page.waitForSelector(".message.user .branch-at:has-text('1 / 2')");
  assert.equal(await page.textContent(".message.user .body"), "first version");
  assert.equal(await page.locator(".message.assistant").count(), 1, "the first version's answer");
  // Regenerate keeps the earlier answer as another version.
  const before = await page.textContent(".message.assistant .body");
  await page.click(".message.assistant .regenerate");
  await page.waitForSelector(".message.assistant .branch-at:has-text('2 / 2')", { timeout: 30000 });
  await page.click(".message.assistant .branch-prev");
  await page.waitForSelector(".message.assistant .branch-at:has-text('1 / 2')");
  assert.equal(await page.textContent(".message.assistant .body"), before);
  await shot("12-versions");
});

test("a Markdown table renders as a table, and answers cannot run script", async () => {
  moss("debug", "seed-answer", "--email", "admin@example.com", "--question", "Films?",
    "--answer", "| 电影 | 导演 |\n|---|---|\n| 黑客帝国 | 沃卓斯基 |\n\n```python\nprint('hi')\n```");
  moss("debug", "seed-answer", "--email", "admin@example.com", "--question", "xss",
    "--answer", "look <img src=x onerror=\"alert(1)\"> and <script>window.__xss = 1; alert(2)</script> [click](javascript:alert(3))");
  await page.reload();
  await page.click("#conversations li:has-text('Films?') .conv-title");
  await page.waitForSelector(".message.assistant table");
  assert.equal(await page.textContent(".message.assistant table td"), "黑客帝国");
  assert.equal(await page.locator(".message.assistant pre code").count(), 1);
  // A code block has its language and copies its code alone.
  assert.equal(await page.textContent(".message.assistant .code-bar .code-lang"), "python");
  await page.click(".message.assistant .copy-code");
  assert.equal(await page.evaluate(() => navigator.clipboard.readText()), "print('hi')\n");
  assert.ok((await page.locator(".message.assistant pre code span[class^=hl-]").count()) > 0, "code is highlighted");
  await shot("04-table");
  await page.click("#conversations li:has-text('xss') .conv-title");
  await page.waitForSelector(".message.assistant .body:has-text('look')");
  // Two animation frames: anything the answer could have made run has had its turn.
  await page.evaluate(() => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done))));
  assert.equal(await page.evaluate(() => window.__xss), undefined);
  assert.equal(page.__dialogs || 0, 0, "no alert ran");
  assert.equal(await page.locator(".message.assistant img, .message.assistant script, .message.assistant a[href^=javascript]").count(), 0);
});

test("the consent switch records every grant and withdrawal", async () => {
  await page.click("[data-view=settings]");
  await page.waitForSelector("#consent-text:not(:empty)");
  // The checkbox sits on its label's line.
  const box = await page.locator("#consent-switch").boundingBox();
  const label = await page.locator("label.switch span:visible").boundingBox();
  assert.ok(Math.abs((box.y + box.height / 2) - (label.y + label.height / 2)) < 6, "checkbox beside its label");
  assert.equal(await page.isChecked("#consent-switch"), false, "off until turned on");
  await page.check("#consent-switch");
  await page.waitForSelector("#consent-result:has-text('Saved')");
  await page.uncheck("#consent-switch");
  await page.waitForFunction(() => document.querySelector("#consent-switch").checked === false);
  const saved = page.waitForResponse((r) => r.url().endsWith("/api/consent") && r.request().method() === "PUT");
  await page.check("#consent-switch");
  await saved;
  const c = await api("GET", "/api/consent");
  assert.deepEqual(c.body.history.map((r) => r.granted), [1, 0, 1]);
  assert.equal(c.body.model_improvement, true);
  await shot("05-settings");
  await accessible("settings");
  await page.click("[data-view=chat]");
});

test("thumbs down with a comment is stored", async () => {
  await page.click("#conversations li:has-text('Films?') .conv-title");
  await page.waitForSelector(".message.assistant .rate-down");
  await page.click(".message.assistant .rate-down");
  // Its Send button stays on one line, even on a phone.
  await page.setViewportSize({ width: 390, height: 844 });
  const send = await page.locator(".tools form.feedback button").boundingBox();
  const line = await page.locator(".tools form.feedback input").boundingBox();
  assert.ok(send.height <= line.height + 4, `Send is one line: ${send.height} vs ${line.height}`);
  await page.setViewportSize({ width: 1200, height: 800 });
  await page.fill(".tools form.feedback input", "the director is wrong");
  await page.click(".tools form.feedback button");
  await page.waitForSelector(".tools .thanks");
  const exported = moss("admin", "feedback", "export");
  const records = exported.trim().split("\n").map((l) => JSON.parse(l));
  assert.equal(records.length, 1);
  assert.equal(records[0].rating, -1);
  assert.equal(records[0].comment, "the director is wrong");
  // The rating is still shown after a reload.
  await page.reload();
  await page.click("#conversations li:has-text('Films?') .conv-title");
  await page.waitForSelector(".message.assistant .rate-down.chosen");
  assert.equal(await page.locator(".message.assistant .rate-up.chosen").count(), 0);
});

test("search finds a Chinese and an English conversation by a word in an answer", async () => {
  // Words the tiny model's noise cannot contain (its answers are in the other conversations).
  moss("debug", "seed-answer", "--email", "admin@example.com", "--question", "苔藓", "--answer", "苔藓花园在京都很有名。");
  moss("debug", "seed-answer", "--email", "admin@example.com", "--question", "Spices", "--answer", "Cloves come from Zanzibar.");
  await page.reload();
  const listed = (want) => page.waitForFunction((w) =>
    [...document.querySelectorAll("#conversations .conv-title")].map((a) => a.textContent).join("|") === w, want);
  await page.fill("#search", "花园");
  await listed("苔藓");
  await page.fill("#search", "zanzibar");
  await listed("Spices");
  await page.fill("#search", "zzzz");
  await page.waitForSelector("#conversations li.hint");
  await page.fill("#search", "");
  await page.waitForFunction(() => document.querySelectorAll("#conversations .conv-title").length > 2);
});

test("renaming happens in an in-page dialog, and an empty title changes nothing", async () => {
  const li = "#conversations li:has-text('Films?')";
  await page.click(`${li} .conv-action >> nth=0`);
  await page.waitForSelector("dialog.ask[open] input");
  await page.fill("dialog.ask input", "   ");
  await page.click("dialog.ask button[type=submit]");
  await page.waitForSelector("dialog.ask", { state: "detached" });
  assert.ok(await page.isVisible(li), "the old title stays");
  await page.click(`${li} .conv-action >> nth=0`);
  await page.fill("dialog.ask input", "Films and directors");
  await page.click("dialog.ask button[type=submit]");
  await page.waitForSelector("#conversations li:has-text('Films and directors')");
  await page.waitForFunction(() => document.title.startsWith("Films and directors"));
  assert.equal(page.__dialogs || 0, 0, "no browser dialog");
});

test("a new chat welcomes with the model's name and examples; an example asks at once", async () => {
  await page.click("#new-chat");
  await page.waitForSelector(".welcome .example");
  const me = await api("GET", "/api/me");
  assert.ok(me.body.model, "the model is named");
  assert.match(await page.textContent(".welcome .hint"), new RegExp(me.body.model.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")));
  assert.equal(await page.evaluate(() => document.activeElement.id), "prompt", "the composer has the focus");
  // The page's first stop in tab order is a skip link, which leads to the composer.
  assert.equal(await page.evaluate(() => document.querySelector("a[href], button, input, textarea, select").className), "skip-link");
  await page.focus(".skip-link");
  await page.keyboard.press("Enter");
  assert.equal(await page.evaluate(() => document.activeElement.id), "prompt");
  await shot("09-welcome");
  await accessible("welcome");
  await page.click(".welcome .example >> nth=0");
  await page.waitForURL(/\/c\/\d+$/);
  await page.waitForSelector(".message.assistant .tools .regenerate", { timeout: 30000 });
  assert.equal(await page.locator(".welcome").count(), 0);
});

test("dark mode follows the switch, and the page stays readable", async () => {
  await page.click("[data-action=toggle-theme]");
  assert.equal(await page.getAttribute("html", "data-theme"), "dark");
  const bg = await page.evaluate(() => getComputedStyle(document.querySelector("#chat-view")).backgroundColor + " " + getComputedStyle(document.documentElement).backgroundColor);
  assert.match(bg, /rgb\(20, 26, 23\)/, bg);
  await shot("10-dark");
  await accessible("dark");
  await page.reload();
  assert.equal(await page.getAttribute("html", "data-theme"), "dark", "remembered");
  await page.setViewportSize({ width: 390, height: 844 });
  await shot("11-dark-phone");
  await page.setViewportSize({ width: 1200, height: 800 });
  await page.click("[data-action=toggle-theme]");
  assert.equal(await page.getAttribute("html", "data-theme"), "light");
});

test("the admin admits a waitlist entry", async () => {
  await page.goto(`${base}/admin`);
  await page.waitForSelector("#waitlist-table td:has-text('waiting@example.com')");
  await page.fill("#admit-form [name=count]", "1");
  await page.click("#admit-form button");
  await page.waitForSelector("#admit-form .result:has-text('waiting@example.com')");
  await page.waitForSelector("#waitlist-table tr:has-text('waiting@example.com') td:has-text('invited')");
  await shot("06-admin");
  // The dashboard draws what this test's own traffic did (answers, a refused send, tokens).
  await page.waitForFunction(async () => {
    const r = await fetch("/api/admin/dashboard?range=hour");
    const d = await r.json();
    return d.charts.find((c) => c.id === "requests").summary > 0 && d.charts.find((c) => c.id === "tokens").summary > 0;
  }, null, { timeout: 15000 });
  await page.reload();
  await page.waitForSelector("#charts [data-chart=requests] polyline[data-series=answered]");
  const drawn = await page.getAttribute("#charts [data-chart=requests] polyline[data-series=answered]", "points");
  assert.ok(drawn.split(" ").some((p) => Number(p.split(",")[1]) < 130), "the answered line rises above zero");
  await page.click("[data-range=day]");
  await page.waitForSelector("[data-range=day].chosen");
  await page.locator("#dashboard").screenshot({ path: join(shots, "16-dashboard.png") });
  await accessible("admin");
});

test("the interface switches to Chinese", async () => {
  await page.goto(base);
  await page.click("[data-action=toggle-lang]");
  assert.equal(await page.getAttribute("html", "lang"), "zh-CN");
  assert.ok(await page.isVisible("#send span[lang=zh]"));
  assert.ok(!(await page.isVisible("#send span[lang=en]")));
  // Everything the script wrote changes at once, without a reload.
  assert.equal(await page.getAttribute("#prompt", "placeholder"), "用中文或英文问任何问题。");
  await page.click("#conversations li:has-text('Films') .conv-title");
  await page.waitForSelector(".message.assistant .tools button.copy:has-text('复制')");
  await page.click("#new-chat");
  assert.equal(await page.textContent(".welcome h2"), "有什么可以帮你？");
  await shot("07-chinese");
  await accessible("chinese");
});

test("a session that ended leads to the sign-in form and back, with the draft kept", async () => {
  await page.goto(base);
  const conv = (await api("GET", "/api/conversations")).body.conversations[0].id;
  await page.goto(`${base}/c/${conv}`);
  await page.waitForSelector("#composer");
  await page.fill("#prompt", "my unsent question");
  await page.context().clearCookies(); // signed out elsewhere, or the session expired
  await page.click("#send");
  await page.waitForSelector("[data-form=login]");
  assert.equal(new URL(page.url()).pathname, `/c/${conv}`);
  await page.fill("[data-form=login] [name=email]", "admin@example.com");
  await page.fill("[data-form=login] [name=password]", "a long enough password");
  await page.click("[data-form=login] button[type=submit]");
  await page.waitForSelector("#composer");
  assert.equal(new URL(page.url()).pathname, `/c/${conv}`, "back where it was");
  await page.waitForFunction(() => document.getElementById("prompt").value === "my unsent question");
  await page.fill("#prompt", "");
  await page.evaluate(() => sessionStorage.clear());
});

test("it is usable on a phone screen", async () => {
  await page.setViewportSize({ width: 390, height: 800 });
  await page.reload();
  assert.ok(await page.isVisible("#composer"));
  assert.ok(!(await page.isVisible("#sidebar")));
  await page.click("#toggle-sidebar");
  assert.ok(await page.isVisible("#sidebar"));
  await shot("08-phone");
  await page.click("#toggle-sidebar");
  await page.goto(`${base}/admin`);
  const wide = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(wide <= 390, `the admin page fits the phone (${wide} px)`);
  await accessible("admin on a phone");
  await page.goto(base);
  await page.setViewportSize({ width: 1200, height: 800 });
});

test("the operator admits one entry, promotes a user and hands a reset link to someone without mail", async () => {
  await page.goto(base);
  await api("POST", "/api/waitlist", { email: "row@example.com" });
  const invite = await api("POST", "/api/admin/invites", { count: 1 });
  // A second person registers in a browser of their own.
  const other = await browser.newContext({ locale: "en-US", viewport: { width: 390, height: 844 } });
  const theirs = await other.newPage();
  await theirs.goto(`${base}/register?code=${invite.body.codes[0]}`);
  await theirs.fill("[data-form=register] [name=email]", "user2@example.com");
  await theirs.fill("[data-form=register] [name=password]", "their first password");
  await theirs.click("[data-form=register] button[type=submit]");
  await theirs.waitForSelector("#composer");
  await page.goto(`${base}/admin`);
  // Codes made on the page come as invitation links, with an expiry.
  await page.fill("#invite-form [name=expires_in_days]", "7");
  await page.fill("#invite-form [name=note]", "from the page");
  await page.click("#invite-form button[type=submit]");
  await page.waitForSelector("#new-codes .invite-link");
  assert.match(await page.inputValue("#new-codes .invite-link"), /\/register\?code=/);
  await page.waitForSelector("#invites-table td:has-text('from the page')");
  await page.click("#waitlist-table tr:has-text('row@example.com') .admit-one");
  await page.waitForSelector("#row-result .link-field");
  assert.match(await page.inputValue("#row-result .link-field"), /\/register\?code=/);
  await page.waitForSelector("#waitlist-table tr:has-text('row@example.com') td:has-text('invited')");
  await page.selectOption("#users-table tr:has-text('user2@example.com') select.role", "admin");
  await page.waitForSelector("#row-result:has-text('user2@example.com')");
  const users = await api("GET", "/api/admin/users");
  assert.equal(users.body.users.find((u) => u.email === "user2@example.com").role, "admin");
  await page.click("#users-table tr:has-text('user2@example.com') .reset-link");
  await page.waitForFunction(() => (document.querySelector("#row-result .link-field")?.value || "").includes("/reset?token="));
  const link = await page.inputValue("#row-result .link-field");
  await theirs.goto(link);
  await theirs.fill("[data-form=reset] [name=password]", "a password from the link");
  await theirs.click("[data-form=reset] button[type=submit]");
  await theirs.waitForSelector("[data-form=reset] .result:has-text('Password changed')");
  const signIn = await theirs.evaluate(async () => (await fetch("/api/login", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ email: "user2@example.com", password: "a password from the link" }) })).status);
  assert.equal(signIn, 200);
  await shot("14-admin-rows");
  await other.close();
  // The waitlist can be searched; a user is deleted with two clicks on the same button.
  await page.fill("#waitlist-search", "row@");
  await page.waitForFunction(() => document.querySelectorAll("#waitlist-table tbody tr").length === 1);
  await page.click("#users-table tr:has-text('user2@example.com') .delete-user");
  await page.click("#users-table tr:has-text('user2@example.com') .delete-user.armed");
  await page.waitForSelector("#users-table tr:has-text('user2@example.com')", { state: "detached" });
  assert.equal(page.__dialogs || 0, 0, "no browser dialog");
});

test("the account page: a new name, a new password, a download that parses, and deleting the account", async () => {
  await page.goto(base);
  await page.evaluate(() => localStorage.setItem("moss.lang", "en"));
  await page.reload();
  await page.click("[data-view=settings]");
  await page.waitForFunction(() => document.querySelector("#name-form [name=display_name]").value === "Ada");
  await page.fill("#name-form [name=display_name]", "Ada L.");
  await page.click("#name-form button[type=submit]");
  await page.waitForSelector("#name-form .result:has-text('Saved')");
  await page.fill("#password-form [name=current]", "a long enough password");
  await page.fill("#password-form [name=password]", "an even longer password");
  await page.click("#password-form button[type=submit]");
  await page.waitForSelector("#password-form .result:has-text('Saved')");
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#download")]);
  const data = JSON.parse(readFileSync(await download.path(), "utf8"));
  assert.equal(data.account.email, "admin@example.com");
  assert.equal(data.account.display_name, "Ada L.");
  assert.ok(data.conversations.some((c) => c.title.startsWith("hello world")), "the conversations");
  assert.deepEqual(data.consent_history.map((r) => r.granted), [1, 0, 1], "the consent history");
  await shot("15-account");
  await accessible("account");
  await page.fill("#delete-form [name=password]", "an even longer password");
  await page.click("#delete-form button[type=submit]");
  await page.click("dialog.ask button[type=submit]");
  await page.waitForSelector("[data-form=login]");
  const signIn = await page.evaluate(async () => (await fetch("/api/login", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ email: "admin@example.com", password: "an even longer password" }) })).status);
  assert.equal(signIn, 401, "the account is gone");
});
