// Drives two real pages in headless Chromium against a three-instance Parley cluster that
// tests/browser.rs started: a customer on the widget demo page and an agent on the console
// chat; the instance that owns the chat is killed with SIGKILL mid-chat; both pages go on.
// Writes what each page shows (every list item of each transcript) to the result file for
// the Rust side to compare with the server's transcript, and screenshots to the artifacts.
//
// Input (environment): PARLEY_BROWSER_TEST = {"instances":[{"id","url","pid"}], "agent_token",
// "artifacts", "result"}.

import { chromium } from "playwright-core";
import { writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { once } from "node:events";
import { join } from "node:path";

const cfg = JSON.parse(process.env.PARLEY_BROWSER_TEST);
const [a, b] = cfg.instances;
const shot = (page, name) => page.screenshot({ path: join(cfg.artifacts, `${name}.png`), fullPage: true });
const log = (...args) => console.log("[browser]", ...args);

function check(ok, message) {
  if (!ok) throw new Error(`check failed: ${message}`);
}

// The customer's page is a shop's, on its own origin (as on a real site): it serves the widget
// script it took from the cluster and lists the three instances; every API call crosses origins.
const bundle = await (await fetch(`${b.url}/widget/parley-widget.js`)).text();
const shopPage = `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Example Shop</title></head>
<body><h1>Example Shop</h1><p>Questions about an order? <a href="#faq">Read the FAQ</a> or chat with us.</p>
<script src="/parley-widget.js" defer data-instances="${cfg.instances.map((i) => i.url).join(" ")}"></script></body></html>`;
const shop = createServer((req, res) => {
  const js = req.url === "/parley-widget.js";
  res.writeHead(200, { "content-type": js ? "text/javascript; charset=utf-8" : "text/html; charset=utf-8" });
  res.end(js ? bundle : shopPage);
}).listen(0, "127.0.0.1");
await once(shop, "listening");
const shopUrl = `http://127.0.0.1:${shop.address().port}`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const problems = [];
async function page(viewport) {
  const context = await browser.newContext({ viewport });
  const p = await context.newPage();
  p.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  p.on("console", (m) => {
    if (m.text().includes("Content Security Policy")) problems.push(`CSP: ${m.text()}`);
  });
  p.setDefaultTimeout(20000);
  return p;
}

/** Every item of the transcript list(s) on a page or in a part of it, in the order shown. */
const items = (scope) =>
  scope.locator("ol.parley-log li").evaluateAll((lis) =>
    lis.map((li) => ({
      seq: li.dataset.seq ? Number(li.dataset.seq) : null,
      kind: li.dataset.kind,
      state: li.dataset.state,
      mine: li.dataset.mine === "true",
      text: li.querySelector(".parley-text")?.textContent ?? "",
    })),
  );

/** Waits until the page shows each text as a message, own ones acknowledged ("sent"). */
async function shows(p, texts, who) {
  await p.waitForFunction(
    (texts) => {
      const lis = [...document.querySelectorAll("ol.parley-log li[data-kind=message]")];
      return texts.every((t) => lis.some((li) => li.querySelector(".parley-text").textContent === t && (li.dataset.state === "sent" || li.dataset.state === "received")));
    },
    texts,
    { timeout: 30000 },
  ).catch(async (e) => {
    throw new Error(`${who} does not show ${JSON.stringify(texts)} as delivered: ${JSON.stringify(await items(p))} (${e.message})`);
  });
}

async function focused(p) {
  return p.evaluate(() => {
    const e = document.activeElement;
    return e ? (e.labels && e.labels[0] ? e.labels[0].textContent.trim() : e.textContent.trim() || e.id) : "";
  });
}

try {
  // --- The customer, keyboard only, on the shop's page; the chat starts on A (listed first). ---
  const customer = await page({ width: 900, height: 720 });
  await customer.goto(`${shopUrl}/`);
  // Tab goes through the page's own links, then reaches the widget.
  const path = [];
  for (let i = 0; i < 6 && path[path.length - 1] !== "Chat with us"; i++) {
    await customer.keyboard.press("Tab");
    path.push((await focused(customer)).slice(0, 40));
  }
  check(path[path.length - 1] === "Chat with us", `Tab reaches the widget's button: focus went ${JSON.stringify(path)}`);
  await customer.keyboard.press("Enter");
  check((await focused(customer)).startsWith("Your name"), "opening the widget focuses the name field");
  await customer.keyboard.type("Ann 安娜");
  await customer.keyboard.press("Tab");
  check((await focused(customer)).startsWith("What is it about?"), "Tab goes on to the subject");
  await customer.keyboard.type("Order #42 — 配達はいつ?");
  await customer.keyboard.press("Enter");
  await customer.waitForSelector(".parley-status[data-state=connected]");
  check((await focused(customer)).startsWith("Message"), "the message box has the focus once the chat started");
  const owner = await customer.$eval(".parley-widget", (w) => w.dataset.instance);
  log("chat started, served by", owner);

  // --- The demo page Parley serves (under its Content-Security-Policy) opens the widget too. ---
  const demo = await page({ width: 900, height: 720 });
  await demo.goto(`${b.url}/widget/`);
  await demo.getByRole("button", { name: "Chat with us" }).click();
  await demo.getByLabel("Your name").waitFor();
  await demo.close();

  // --- The agent signs in on the console served by B and joins from the queue. ---
  const agent = await page({ width: 1280, height: 800 });
  await agent.goto(`${b.url}/agent/`);
  await agent.getByLabel("Agent token").fill(cfg.agent_token);
  await agent.getByLabel("Your name (customers see it)").fill("Bob");
  await agent.getByLabel("Your name (customers see it)").press("Enter");
  await agent.getByRole("button", { name: "Join the chat with Ann 安娜" }).click();
  const card = agent.locator("article.chat", { hasText: "Ann 安娜" });
  await card.locator(".parley-status[data-state=connected]").waitFor();
  check((await card.getAttribute("data-instance")) === owner, "the console shows the instance that owns the chat");
  const reply = agent.getByLabel("Message to Ann 安娜");

  // --- They talk: Enter sends, non-ASCII both ways. ---
  const before = [
    ["customer", "Hello! こんにちは、注文番号は42です"],
    ["agent", "Hi Ann, let me check. 안녕하세요"],
    ["customer", "مرحبا — it was due Monday"],
    ["agent", "שלום, it left the warehouse today 📦"],
    ["customer", "Thanks 👩‍👩‍👧 family order, Ünïcödé é"],
    ["agent", "It arrives tomorrow, 明日届きます"],
  ];
  // Each line typed where its writer types: the customer on the keyboard alone, the agent
  // into the chat's reply box; Enter sends.
  const say = async (lines) => {
    for (const [who, text] of lines) {
      if (who === "customer") {
        await customer.keyboard.type(text);
        await customer.keyboard.press("Enter");
      } else {
        await reply.fill(text);
        await reply.press("Enter");
      }
    }
  };
  await say(before);
  const texts = (list) => list.map(([, t]) => t);
  await shows(customer, texts(before), "the customer page");
  await shows(agent, texts(before), "the agent page");
  await shot(customer, "customer-1-before-failover");
  await shot(agent, "agent-1-before-failover");

  // --- The owner dies mid-chat; both type during the outage. ---
  const victim = cfg.instances.find((i) => i.id === owner);
  check(victim, `the owner ${owner} is one of the cluster's instances`);
  process.kill(victim.pid, "SIGKILL");
  log("killed", owner, "pid", victim.pid);
  const during = [
    ["customer", "Are you still there? まだいますか"],
    ["agent", "Still here — 대기 중"],
  ];
  await say(during);
  // The customer's page talked to the dead instance itself: it reconnects elsewhere. The
  // agent's requests go through B, which holds them until it restored the chat.
  await customer.waitForSelector(".parley-status[data-state=reconnecting]", { timeout: 10000 });
  for (const [p, text, who] of [[customer, during[0][1], "customer"], [agent, during[1][1], "agent"]]) {
    const waiting = (await items(p)).filter((i) => i.mine && i.text === text);
    check(waiting.length === 1 && waiting[0].state === "sending", `the ${who}'s message typed during the outage shows as sending, not sent: ${JSON.stringify(waiting)}`);
  }
  await shot(customer, "customer-2-reconnecting");
  await shot(agent, "agent-2-reconnecting");

  await customer.waitForSelector(".parley-status[data-state=restored]", { timeout: 30000 });
  await card.locator(".parley-status[data-state=restored]").waitFor({ timeout: 30000 });
  const restoredOn = await customer.$eval(".parley-widget", (w) => w.dataset.instance);
  check(restoredOn && restoredOn !== owner, `restored on another instance (${restoredOn}), not ${owner}`);
  check((await card.getAttribute("data-instance")) === restoredOn, "both pages show the same new instance");
  await shows(customer, texts(during), "the customer page after the failover");
  await shows(agent, texts(during), "the agent page after the failover");

  const after = [
    ["customer", "Great, thank you! ありがとう"],
    ["agent", "You're welcome, Ann 🙂"],
  ];
  await say(after);
  await shows(customer, texts(after), "the customer page");
  await shows(agent, texts(after), "the agent page");
  await shot(customer, "customer-3-after-failover");
  await shot(agent, "agent-3-after-failover");

  // --- The customer reloads the page: the widget picks its chat up again from the start,
  // every message once, in order, and goes on. ---
  const beforeReload = (await items(customer)).filter((i) => i.kind === "message").map((i) => [i.seq, i.text]);
  await customer.reload();
  await customer.waitForSelector(".parley-status[data-state=connected]");
  await shows(customer, texts([...before, ...during, ...after]), "the customer page after a reload");
  const afterReload = (await items(customer)).filter((i) => i.kind === "message").map((i) => [i.seq, i.text]);
  check(JSON.stringify(afterReload) === JSON.stringify(beforeReload), `a reload shows the same transcript: ${JSON.stringify(afterReload)} vs ${JSON.stringify(beforeReload)}`);
  const afterReloadText = "Back after a reload 🔄";
  await customer.getByLabel("Message", { exact: true }).fill(afterReloadText);
  await customer.getByLabel("Message", { exact: true }).press("Enter");
  after.push(["customer", afterReloadText]);
  await shows(customer, [afterReloadText], "the customer page after a reload");
  await shows(agent, [afterReloadText], "the agent page");

  // --- A second customer, on the page served by C: the agent works both chats at once,
  // sees typing both ways, and closes the second one. ---
  const c = cfg.instances.find((i) => i.id !== owner && i.id !== b.id) || b;
  const second = await page({ width: 900, height: 720 });
  await second.goto(`${c.url}/widget/`);
  await second.getByRole("button", { name: "Chat with us" }).click();
  await second.getByLabel("Your name").fill("Chen 陈");
  await second.getByLabel("What is it about?").fill("Refund");
  await second.getByRole("button", { name: "Start chat" }).click();
  await second.waitForSelector(".parley-status[data-state=connected]");
  await agent.getByRole("button", { name: "Join the chat with Chen 陈" }).click();
  const card2 = agent.locator("article.chat", { hasText: "Chen 陈" });
  await card2.locator(".parley-status[data-state=connected]").waitFor();
  check((await agent.locator("article.chat").count()) === 2, "the console holds both chats");
  await second.getByLabel("Message", { exact: true }).pressSequentially("I would like a ref");
  await card2.locator(".parley-typing", { hasText: "Chen 陈 is typing…" }).waitFor();
  const reply2 = agent.getByLabel("Message to Chen 陈");
  await reply2.pressSequentially("Let me look");
  await second.locator(".parley-typing", { hasText: "Bob is typing…" }).waitFor();
  await second.getByLabel("Message", { exact: true }).press("Enter");
  await reply2.press("Enter");
  await shows(second, ["I would like a ref", "Let me look"], "the second customer's page");
  await shows(agent, ["I would like a ref", "Let me look"], "the agent page, second chat");
  await agent.getByRole("button", { name: "Close the chat with Chen 陈" }).click();
  await second.waitForSelector(".parley-status[data-state=closed]");
  await card2.locator(".parley-status[data-state=closed]").waitFor();
  check(await second.getByLabel("Message", { exact: true }).isHidden(), "a closed chat takes no more messages");
  check((await card.locator(".parley-status").getAttribute("data-state")) === "restored", "the first chat is untouched by closing the second");
  await shot(agent, "agent-4-two-chats-one-closed");
  await shot(second, "customer2-closed");
  const items2 = (await items(agent)).filter((i) => i.kind === "message" && ["I would like a ref", "Let me look"].includes(i.text));
  check(items2.length === 2, `the second chat's messages show once: ${JSON.stringify(items2)}`);

  const shown = { customer: await items(customer), agent: await items(card) };
  const statusLine = {
    customer: await customer.$eval(".parley-status", (s) => s.textContent),
    agent: await card.locator(".parley-status").textContent(),
  };
  check(problems.length === 0, `no script errors on the pages: ${problems.join("; ")}`);
  const chat = await customer.evaluate(() => JSON.parse(sessionStorage.getItem("parley-widget-chat")));
  writeFileSync(cfg.result, JSON.stringify({ chat_id: chat.chatId, customer_token: chat.token, owner, restored_on: restoredOn, status: statusLine, sent: [...before, ...during, ...after], shown }, null, 1));
  log("done; restored on", restoredOn);
} finally {
  await browser.close();
  shop.close();
}
