/* Parley's transcript view, shared by the widget and the agent console: one list item per
 * transcript event, in seq order, and one per own message still waiting for its
 * acknowledgement at the end. An own message shows "Sent" only once the server acknowledged
 * it with a seq; when its event arrives first it takes its place in the order but keeps
 * "Sending…" until then.
 *
 * Each item carries data-seq, data-kind, data-state ("sending" | "sent" | "failed" |
 * "received") and data-mine, which is also what the browser tests read.
 */
(function (global) {
  "use strict";
  const Parley = global.Parley;
  if (Parley.TranscriptView) return;

  const STATE_TEXT = { sending: "Sending…", sent: "Sent", failed: "Not sent", received: "" };

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("data-") || k.startsWith("aria-") || k === "role" || k === "for" || k === "id") node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) if (c) node.append(c);
    return node;
  }

  function clock(ms) {
    return ms ? new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "";
  }

  /** What a non-message event says, in words. */
  function describe(e) {
    switch (e.kind) {
      case "joined":
        return `${e.nickname} joined`;
      case "left":
        return `${e.nickname} left`;
      case "reconnected":
        return `${e.nickname} reconnected`;
      case "moved":
        return `Chat restored: ${e.text}`;
      case "closed":
        return e.text ? `Chat closed: ${e.text}` : "Chat closed";
      default:
        return e.text;
    }
  }

  class TranscriptView {
    /** `list`: an <ol> with role="log"; `me`: the viewer's participant id. */
    constructor(list, me) {
      this.list = list;
      this.me = me;
    }

    /** The first item still waiting for its event: transcript items go before it. */
    firstUnplaced() {
      return this.list.querySelector("li[data-placed='false']");
    }

    /** A transcript event (or a notice) arrived. */
    event(e) {
      const mine = e.kind === "message" && e.participant_id === this.me;
      let item = mine && e.client_msg_id ? this.list.querySelector(`li[data-client-msg-id="${CSS.escape(e.client_msg_id)}"]`) : null;
      if (item) {
        item.remove();
      } else {
        item = this.item(e, mine, mine ? "sent" : "received");
      }
      if (e.seq !== undefined) item.dataset.seq = String(e.seq);
      item.dataset.placed = "true";
      this.list.insertBefore(item, this.firstUnplaced());
      this.reveal();
    }

    /** An own message was queued: shown at the end as "Sending…". */
    outbox(m) {
      const item = this.item({ kind: "message", text: m.text, nickname: "You", at: Date.now() }, true, "sending");
      item.dataset.clientMsgId = m.clientMsgId;
      item.dataset.placed = "false";
      this.list.append(item);
      this.reveal();
    }

    /** An own message was acknowledged (or refused for good). */
    acked(m) {
      const item = this.list.querySelector(`li[data-client-msg-id="${CSS.escape(m.clientMsgId)}"]`);
      if (!item) return;
      this.setState(item, m.state, m.error ? m.error.message : "");
    }

    item(e, mine, state) {
      const item = el("li", { class: `parley-item parley-${e.kind}`, "data-kind": e.kind, "data-mine": String(mine) });
      if (e.kind === "message") {
        item.append(
          el("span", { class: "parley-who", text: mine ? "You" : e.nickname }),
          el("time", { class: "parley-at", text: clock(e.at) }),
          el("p", { class: "parley-text", text: e.text }),
          el("span", { class: "parley-state" }),
        );
        if (e.client_msg_id) item.dataset.clientMsgId = e.client_msg_id;
        this.setState(item, state, "");
      } else {
        item.append(el("p", { class: "parley-text", text: describe(e) }));
        item.dataset.state = "received";
      }
      return item;
    }

    setState(item, state, why) {
      item.dataset.state = state;
      const label = item.querySelector(".parley-state");
      if (label) label.textContent = why ? `${STATE_TEXT[state]}: ${why}` : STATE_TEXT[state];
    }

    reveal() {
      this.list.scrollTop = this.list.scrollHeight;
    }
  }

  /** "Ann is typing…" for a few seconds after a typing event, cleared by a message. */
  class TypingLine {
    constructor(node) {
      this.node = node;
      this.timer = null;
    }
    show(e) {
      clearTimeout(this.timer);
      if (e.typing === false) {
        this.node.textContent = "";
        return;
      }
      this.node.textContent = `${e.nickname} is typing…`;
      this.timer = setTimeout(() => (this.node.textContent = ""), 6000);
    }
    clear() {
      clearTimeout(this.timer);
      this.node.textContent = "";
    }
  }

  /** Tells the server this participant is typing, at most every 3 s, and when they stop. */
  function typingReporter(session, input) {
    let last = 0;
    let idle = null;
    input.addEventListener("input", () => {
      const now = Date.now();
      if (now - last > 3000) {
        last = now;
        session.typing(true);
      }
      clearTimeout(idle);
      idle = setTimeout(() => {
        last = 0;
        session.typing(false);
      }, 4000);
    });
    return () => {
      clearTimeout(idle);
      last = 0;
    };
  }

  /** Enter sends, Shift+Enter makes a new line. */
  function enterSends(textarea, form) {
    textarea.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        form.requestSubmit();
      }
    });
  }

  /** The words a status line shows for a session's state. */
  function statusText(state, detail, instance) {
    switch (state) {
      case "connecting":
        return "Connecting…";
      case "connected":
        return `Connected · served by ${instance}`;
      case "reconnecting":
        return "Reconnecting… messages you send now are kept and delivered";
      case "restored":
        return `Restored · now served by ${instance}`;
      case "closed":
        return "Chat ended";
      case "failed":
        return `Disconnected: ${detail}`;
      default:
        return state;
    }
  }

  /**
   * A chat session shown on a page: its transcript in `list`, who is typing in `typingNode`,
   * messages written in `textarea` and sent by `form` (Enter or the button). `status(state,
   * detail)` hears the connection state. Returns the session, not yet started.
   */
  function showSession(cluster, chat, { list, typingNode, textarea, form, status }) {
    const view = new TranscriptView(list, chat.participantId);
    const typing = new TypingLine(typingNode);
    const session = new Parley.ChatSession(cluster, chat, {
      event: (e) => {
        if (e.kind === "message") typing.clear();
        view.event(e);
      },
      typing: (e) => typing.show(e),
      outbox: (m) => view.outbox(m),
      acked: (m) => view.acked(m),
      status,
    });
    const stopTyping = typingReporter(session, textarea);
    enterSends(textarea, form);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const body = textarea.value.trim();
      if (!body || textarea.disabled) return;
      textarea.value = "";
      stopTyping();
      session.send(body);
    });
    return session;
  }

  /** A JSON value kept in sessionStorage (null if absent or unreadable). */
  function stored(key) {
    try {
      return JSON.parse(global.sessionStorage.getItem(key) || "null");
    } catch (_) {
      return null;
    }
  }

  Object.assign(Parley, { TranscriptView, TypingLine, typingReporter, enterSends, statusText, showSession, stored, el });
})(typeof window !== "undefined" ? window : globalThis);
