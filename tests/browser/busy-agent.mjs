// An agent on the console with more chats open than a browser opens HTTP/1.1 connections to
// one origin (six): each chat's card follows its events, and the agent must still get every
// customer's message and have each answer acknowledged at once. With a long poll per chat
// over HTTP/1.1 the seventh request would wait for a poll to end (up to 25 s); the cards
// follow their events over WebSockets (outside that limit), and over HTTPS the browser speaks
// HTTP/2 with Parley, where every request shares one connection.
//
// Input (environment): PARLEY_BROWSER_TEST = {"url", "agent_token", "artifacts", "chats"};
// NODE_EXTRA_CA_CERTS names the test CA so this script's own requests trust the server.

import { chromium } from "playwright-core";
import { join } from "node:path";

const cfg = JSON.parse(process.env.PARLEY_BROWSER_TEST);
const log = (...args) => console.log("[busy-agent]", ...args);

function check(ok, message) {
  if (!ok) throw new Error(`check failed: ${message}`);
}

/** One request as a customer's own client would send it: { status, body }. */
async function api(method, path, token, body) {
  const headers = { "content-type": "application/json" };
  if (token) headers.authorization = `Bearer ${token}`;
  const r = await fetch(`${cfg.url}${path}`, { method, headers, body: body ? JSON.stringify(body) : undefined });
  return { status: r.status, body: await r.json() };
}

// The customers open their chats.
const customers = [];
for (let i = 1; i <= cfg.chats; i++) {
  const name = `Customer ${i}`;
  const r = await api("POST", "/v1/chats", null, { nickname: name, subject: `order ${i}` });
  check(r.status === 201, `chat ${i} opened: ${JSON.stringify(r.body)}`);
  customers.push({ name, chatId: r.body.chat_id, token: r.body.token, hello: `Hello from ${name}`, answer: `Answer for ${name}` });
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const problems = [];
try {
  // Over HTTPS the test CA is not the browser's: accept the certificate (ALPN is unaffected).
  const context = await browser.newContext({ viewport: { width: 1280, height: 1600 }, ignoreHTTPSErrors: true });
  const agent = await context.newPage();
  agent.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  agent.setDefaultTimeout(20000);

  await agent.goto(`${cfg.url}/agent/`);
  await agent.getByLabel("Agent token").fill(cfg.agent_token);
  await agent.getByLabel("Your name (customers see it)").fill("Dana");
  await agent.getByLabel("Your name (customers see it)").press("Enter");
  for (const c of customers) {
    await agent.getByRole("button", { name: `Join the chat with ${c.name}` }).click();
    await agent.locator("article.chat", { hasText: c.name }).locator(".parley-status[data-state=connected]").waitFor();
  }
  log(`joined ${customers.length} chats; each card keeps a long poll open`);

  // Every customer writes; each card shows its customer's message (its long poll answered).
  for (const [i, c] of customers.entries()) {
    const r = await api("POST", `/v1/chats/${c.chatId}/messages`, c.token, { text: c.hello, client_msg_id: `hello-${i}` });
    check(r.status === 200, `${c.name}'s message acknowledged: ${JSON.stringify(r.body)}`);
  }
  const delivered = async (card, text, state, timeout) =>
    card.locator("ol.parley-log li[data-kind=message]", { hasText: text }).and(card.locator(`li[data-state=${state}]`)).waitFor({ timeout });
  for (const c of customers) {
    const card = agent.locator("article.chat", { hasText: c.name });
    await delivered(card, c.hello, "received", 5000).catch((e) => {
      throw new Error(`the card of ${c.name} does not show "${c.hello}" within 5 s: ${e.message}`);
    });
  }

  // The agent answers in every chat, last one first; each answer is acknowledged (saved, its
  // seq known) within 5 s, while all the other cards' long polls stay open.
  for (const c of [...customers].reverse()) {
    const card = agent.locator("article.chat", { hasText: c.name });
    const started = Date.now();
    await agent.getByLabel(`Message to ${c.name}`).fill(c.answer);
    await agent.getByLabel(`Message to ${c.name}`).press("Enter");
    await delivered(card, c.answer, "sent", 5000).catch((e) => {
      throw new Error(`the answer to ${c.name} is not acknowledged within 5 s: ${e.message}`);
    });
    log(`${c.name}: answer acknowledged after ${Date.now() - started} ms`);
  }

  // How the page reached the server: HTTP/2 over HTTPS, HTTP/1.1 over plain HTTP.
  const expected = cfg.url.startsWith("https:") ? "h2" : "http/1.1";
  const protocols = await agent.evaluate(() => [...new Set(performance.getEntriesByType("resource").map((e) => e.nextHopProtocol))]);
  check(protocols.length === 1 && protocols[0] === expected, `the console's requests went over ${expected}: ${JSON.stringify(protocols)}`);
  await agent.screenshot({ path: join(cfg.artifacts, `busy-agent-${expected.replace("/", "")}.png`), fullPage: true });

  // What was saved: each chat holds its customer's message and the agent's answer, once each.
  for (const c of customers) {
    const t = await api("GET", `/v1/chats/${c.chatId}/transcript`, c.token);
    const texts = t.body.events.filter((e) => e.kind === "message").map((e) => e.text);
    check(JSON.stringify(texts) === JSON.stringify([c.hello, c.answer]), `${c.name}'s transcript: ${JSON.stringify(texts)}`);
  }
  check(problems.length === 0, `the page reported no errors: ${problems.join("; ")}`);
  log(`all answers acknowledged (${expected})`);
} finally {
  await browser.close();
}
