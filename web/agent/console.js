/* Parley agent console: sign in with an agent token, watch the queue of waiting chats (from
 * every instance), join chats and work several at once. Each chat shows the instance that
 * serves it and a visible "reconnecting / restored" state when that instance goes away.
 * The sign-in and the joined chats live in sessionStorage: a reload carries on.
 */
(function (global) {
  "use strict";
  const Parley = global.Parley;
  const { el } = Parley;
  const STORAGE_KEY = "parley-agent";
  const $ = (id) => document.getElementById(id);

  const desk = { agent: null, cluster: null, nickname: "", chats: new Map(), queueTimer: null };

  function save() {
    const chats = [...desk.chats.values()].filter((c) => !c.ended).map((c) => c.chat);
    global.sessionStorage.setItem(STORAGE_KEY, JSON.stringify({ token: desk.agent.token, nickname: desk.nickname, instances: desk.cluster.instances, chats }));
  }

  function ago(ms) {
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    return s < 60 ? `${s} s` : `${Math.floor(s / 60)} min`;
  }

  async function refreshQueue() {
    const list = $("queue");
    const status = $("queue-status");
    try {
      const q = await desk.agent.queue();
      const waiting = q.chats.filter((c) => !desk.chats.has(c.chat_id));
      list.replaceChildren(
        ...waiting.map((c) => {
          const join = el("button", { type: "button", text: "Join", "aria-label": `Join the chat with ${c.nickname}` });
          join.addEventListener("click", () => joinChat(c, join));
          return el(
            "li",
            { "data-chat-id": c.chat_id },
            el("span", { class: "who", text: c.nickname }),
            el("span", { class: "meta", text: c.subject || "(no subject)" }),
            el("span", { class: "meta", text: `waiting ${ago(c.waiting_since)} · on ${c.instance}` }),
            join,
          );
        }),
      );
      const missing = q.unreachable && q.unreachable.length ? ` (not answering: ${q.unreachable.join(", ")})` : "";
      status.textContent = (waiting.length ? "" : "No one is waiting.") + missing;
    } catch (e) {
      status.textContent = `Queue unavailable: ${e.message}`;
    }
    desk.queueTimer = setTimeout(refreshQueue, 2000);
  }

  async function joinChat(waiting, button) {
    button.disabled = true;
    try {
      const joined = await desk.agent.join(waiting.chat_id, desk.nickname);
      const chat = { ...joined, customer: waiting.nickname, subject: waiting.subject || "" };
      openChat(chat).text.focus();
      save();
      const item = button.closest("li");
      if (item) item.remove();
      if (!$("queue").children.length) $("queue-status").textContent = "No one is waiting.";
    } catch (e) {
      button.disabled = false;
      $("queue-status").textContent = `Could not join: ${e.message}`;
    }
  }

  /** A chat card: header, status line, transcript, typing line, compose box. */
  function openChat(chat) {
    const n = desk.chats.size + 1;
    const titleId = `chat-title-${n}`;
    const textId = `chat-text-${n}`;
    const status = el("p", { class: "parley-status", role: "status", "aria-live": "polite", text: "Connecting…" });
    const log = el("ol", { class: "parley-log", role: "log", "aria-live": "polite", "aria-label": `Messages with ${chat.customer}`, tabIndex: 0 });
    const typingLine = el("p", { class: "parley-typing", "aria-live": "polite" });
    const text = el("textarea", { id: textId, rows: 2, maxLength: 4000, placeholder: "Reply — Enter sends" });
    const compose = el(
      "form",
      { class: "compose", "aria-label": `Reply to ${chat.customer}` },
      el("label", { for: textId }, el("span", { class: "visually-hidden", text: `Message to ${chat.customer}` }), text),
      el("button", { type: "submit", text: "Send" }),
    );
    const closeButton = el("button", { type: "button", text: "Close chat", "aria-label": `Close the chat with ${chat.customer}` });
    const card = el(
      "article",
      { class: "chat", "aria-labelledby": titleId, "data-chat-id": chat.chatId },
      el("header", {}, el("h3", { id: titleId, text: chat.subject ? `${chat.customer} — ${chat.subject}` : chat.customer }), closeButton),
      status,
      log,
      typingLine,
      compose,
    );
    $("chats").append(card);

    const entry = { chat, card, text, ended: false, session: null };
    const session = Parley.showSession(desk.cluster, chat, {
      list: log,
      typingNode: typingLine,
      textarea: text,
      form: compose,
      status: (state, detail) => {
        status.dataset.state = state;
        status.textContent = Parley.statusText(state, detail, session.instance);
        card.dataset.instance = session.instance || "";
        if (state === "closed" || state === "failed") ended();
      },
    });
    entry.session = session;
    desk.chats.set(chat.chatId, entry);

    function ended() {
      entry.ended = true;
      compose.querySelector("button").disabled = true;
      text.disabled = true;
      closeButton.textContent = "Remove";
      closeButton.setAttribute("aria-label", `Remove the chat with ${chat.customer}`);
      save();
    }

    closeButton.addEventListener("click", async () => {
      if (entry.ended) {
        session.stop();
        card.remove();
        desk.chats.delete(chat.chatId);
        save();
        return;
      }
      closeButton.disabled = true;
      try {
        await session.close();
      } catch (e) {
        status.textContent = `Could not close: ${e.message}`;
      }
      closeButton.disabled = false;
    });
    session.start();
    return entry;
  }

  function signedIn(token, nickname, instances, chats) {
    desk.cluster = new Parley.Cluster(instances);
    desk.agent = new Parley.Agent(desk.cluster, token);
    desk.nickname = nickname;
    $("signin").hidden = true;
    $("desk").hidden = false;
    $("sign-out").hidden = false;
    $("signed-in").textContent = `Signed in as ${nickname}`;
    for (const chat of chats || []) openChat(chat);
    save();
    refreshQueue();
  }

  function start() {
    const main = $("console");
    $("agent-instances").value = main.dataset.instances || global.location.origin;
    $("signin").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const token = $("agent-token").value.trim();
      const nickname = $("agent-nickname").value.trim();
      const instances = $("agent-instances").value;
      const error = $("signin-error");
      error.textContent = "";
      try {
        // The queue answers 403 to a token that is not an agent's.
        await new Parley.Agent(new Parley.Cluster(instances), token).queue();
      } catch (e) {
        error.textContent = e.status === 403 || e.status === 401 ? "This agent token was not accepted." : `Cannot reach the cluster: ${e.message}`;
        return;
      }
      signedIn(token, nickname, instances, []);
      $("queue-title").focus();
    });
    $("sign-out").addEventListener("click", () => {
      global.sessionStorage.removeItem(STORAGE_KEY);
      global.location.reload();
    });
    const previous = Parley.stored(STORAGE_KEY);
    if (previous && previous.token) signedIn(previous.token, previous.nickname, previous.instances, previous.chats);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})(typeof window !== "undefined" ? window : globalThis);
