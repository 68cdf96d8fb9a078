/* Parley customer chat widget. A website embeds it with one script tag:
 *
 *   <script src="https://chat.example.com/widget/parley-widget.js" defer
 *           data-instances="https://chat1.example.com https://chat2.example.com"
 *           data-title="Chat with us"></script>
 *
 * data-instances: the cluster's addresses, or one load balancer's (default: where the script
 * came from). The widget keeps its chat in sessionStorage, so a page reload continues it.
 */
(function (global) {
  "use strict";
  const Parley = global.Parley;
  const script = document.currentScript;
  const STORAGE_KEY = "parley-widget-chat";
  const { el } = Parley;

  const CSS_TEXT = `
.parley-widget{position:fixed;right:1.25rem;bottom:1.25rem;z-index:2147483000;font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"Noto Sans","Noto Sans CJK JP",sans-serif;color:#1b1f24}
.parley-widget *{box-sizing:border-box}
.parley-widget [hidden]{display:none!important}
.parley-launcher{background:#1f5fbf;color:#fff;border:0;border-radius:2rem;padding:.75rem 1.25rem;font:inherit;font-weight:600;cursor:pointer;box-shadow:0 2px 8px rgba(0,0,0,.25)}
.parley-launcher:focus-visible,.parley-widget button:focus-visible,.parley-widget input:focus-visible,.parley-widget textarea:focus-visible{outline:3px solid #f5a623;outline-offset:2px}
.parley-panel{width:22rem;max-width:calc(100vw - 2.5rem);height:32rem;max-height:calc(100vh - 6rem);background:#fff;border:1px solid #c9d1db;border-radius:.75rem;box-shadow:0 6px 24px rgba(0,0,0,.2);display:flex;flex-direction:column;overflow:hidden;margin-bottom:.75rem}
.parley-head{background:#1f5fbf;color:#fff;padding:.6rem .9rem;display:flex;align-items:flex-start;gap:.5rem}
.parley-head h2{font-size:1rem;margin:0;flex:1}
.parley-head button{background:transparent;color:#fff;border:1px solid rgba(255,255,255,.6);border-radius:.4rem;font:inherit;font-size:.85rem;padding:.1rem .5rem;cursor:pointer}
.parley-status{font-size:.8rem;padding:.35rem .9rem;margin:0;background:#eef3fb;border-bottom:1px solid #d9e2ef}
.parley-status[data-state=reconnecting]{background:#fff4d6}
.parley-status[data-state=restored]{background:#e3f6e8}
.parley-status[data-state=failed],.parley-status[data-state=closed]{background:#f4e3e3}
.parley-start{padding:1rem;display:flex;flex-direction:column;gap:.75rem}
.parley-start label,.parley-compose label{display:flex;flex-direction:column;font-size:.85rem;gap:.25rem}
.parley-widget input,.parley-widget textarea{font:inherit;padding:.45rem .55rem;border:1px solid #9aa7b6;border-radius:.4rem}
.parley-start button,.parley-compose button{background:#1f5fbf;color:#fff;border:0;border-radius:.4rem;padding:.5rem .9rem;font:inherit;font-weight:600;cursor:pointer}
.parley-log{list-style:none;margin:0;padding:.6rem .9rem;flex:1;overflow-y:auto;display:flex;flex-direction:column;gap:.45rem}
.parley-item{max-width:85%}
.parley-item.parley-message{background:#f0f2f5;border-radius:.6rem;padding:.35rem .6rem}
.parley-item[data-mine=true]{align-self:flex-end;background:#dce8fb}
.parley-item:not(.parley-message){align-self:center;font-size:.8rem;color:#4a5562;max-width:100%;text-align:center}
.parley-item p{margin:0;white-space:pre-wrap;overflow-wrap:anywhere}
.parley-who{font-weight:600;font-size:.8rem;margin-right:.4rem}
.parley-at{font-size:.7rem;color:#5b6673}
.parley-state{display:block;font-size:.7rem;color:#5b6673;text-align:right}
.parley-item[data-state=sending] .parley-state{color:#8a5a00}
.parley-item[data-state=failed] .parley-state{color:#b00020}
.parley-typing{min-height:1.2rem;font-size:.8rem;color:#5b6673;margin:0 .9rem}
.parley-compose{display:flex;gap:.5rem;padding:.6rem .9rem;border-top:1px solid #d9e2ef;align-items:flex-end}
.parley-compose label{flex:1}
.parley-compose textarea{resize:none;height:2.6rem}
.parley-visually-hidden{position:absolute!important;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}
`;

  function mount() {
    const title = (script && script.dataset.title) || "Chat with us";
    const instances = (script && script.dataset.instances) || (script && script.src ? new URL(script.src).origin : global.location.origin);
    const cluster = new Parley.Cluster(instances);

    document.head.append(el("style", { text: CSS_TEXT }));
    const launcher = el("button", { class: "parley-launcher", type: "button", text: title, "aria-expanded": "false", "aria-controls": "parley-panel" });
    const status = el("p", { class: "parley-status", role: "status", "aria-live": "polite", text: "Start a chat and we will answer shortly." });
    const minimize = el("button", { type: "button", text: "Hide", "aria-label": "Hide the chat" });
    const nickname = el("input", { id: "parley-nickname", name: "nickname", required: true, maxLength: 64, autocomplete: "name" });
    const subject = el("input", { id: "parley-subject", name: "subject", maxLength: 200 });
    const start = el(
      "form",
      { class: "parley-start", "aria-label": "Start a chat" },
      el("label", { for: "parley-nickname" }, "Your name", nickname),
      el("label", { for: "parley-subject" }, "What is it about?", subject),
      el("button", { type: "submit", text: "Start chat" }),
    );
    const log = el("ol", { class: "parley-log", role: "log", "aria-live": "polite", "aria-label": "Messages", tabIndex: 0, hidden: true });
    const typingLine = el("p", { class: "parley-typing", "aria-live": "polite" });
    const text = el("textarea", { id: "parley-message", rows: 2, maxLength: 4000, placeholder: "Type a message — Enter sends" });
    const compose = el(
      "form",
      { class: "parley-compose", "aria-label": "Send a message", hidden: true },
      el("label", { for: "parley-message" }, el("span", { class: "parley-visually-hidden", text: "Message" }), text),
      el("button", { type: "submit", text: "Send" }),
    );
    const end = el("button", { type: "button", text: "End chat" });
    end.hidden = true;
    const head = el("div", { class: "parley-head" }, el("h2", { id: "parley-title", text: title }), end, minimize);
    const panel = el("section", { id: "parley-panel", class: "parley-panel", role: "region", "aria-labelledby": "parley-title", hidden: true }, head, status, start, log, typingLine, compose);
    const root = el("div", { class: "parley-widget" }, panel, launcher);
    document.body.append(root);

    let session = null;

    function setOpen(open) {
      panel.hidden = !open;
      launcher.setAttribute("aria-expanded", String(open));
      if (open) (session ? text : nickname).focus();
      else launcher.focus();
    }
    launcher.addEventListener("click", () => setOpen(panel.hidden));
    minimize.addEventListener("click", () => setOpen(false));
    panel.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape") setOpen(false);
    });

    function showStatus(state, detail) {
      status.dataset.state = state;
      status.textContent = Parley.statusText(state, detail, session && session.instance);
      root.dataset.instance = (session && session.instance) || "";
      if (state === "closed" || state === "failed") {
        compose.hidden = true;
        end.hidden = true;
        global.sessionStorage.removeItem(STORAGE_KEY);
      }
    }

    function begin(chat) {
      start.hidden = true;
      log.hidden = false;
      compose.hidden = false;
      end.hidden = false;
      session = Parley.showSession(cluster, chat, { list: log, typingNode: typingLine, textarea: text, form: compose, status: showStatus });
      end.addEventListener("click", async () => {
        end.disabled = true;
        try {
          await session.leave();
          showStatus("closed", "");
        } catch (e) {
          end.disabled = false;
          showStatus("failed", e.message);
        }
      });
      session.start();
      text.focus();
    }

    start.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const button = start.querySelector("button");
      button.disabled = true;
      status.textContent = "Starting your chat…";
      try {
        const chat = await Parley.startChat(cluster, { nickname: nickname.value.trim(), subject: subject.value.trim(), userData: { page: global.location.href.slice(0, 200) } });
        global.sessionStorage.setItem(STORAGE_KEY, JSON.stringify(chat));
        begin(chat);
      } catch (e) {
        button.disabled = false;
        status.dataset.state = "failed";
        status.textContent = `Could not start a chat: ${e.message}`;
      }
    });

    const previous = Parley.stored(STORAGE_KEY);
    if (previous && previous.chatId && previous.token) {
      begin(previous);
      setOpen(true);
    }
    global.ParleyWidget = { open: () => setOpen(true), close: () => setOpen(false) };
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", mount);
  else mount();
})(typeof window !== "undefined" ? window : globalThis);
