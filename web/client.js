/* Parley browser client: talks to any instance of a Parley cluster and moves to another one
 * when an instance fails, the way ARCHITECTURE.md's failover client does.
 *
 *   const cluster = new Parley.Cluster(["http://127.0.0.1:8081", "http://127.0.0.1:8082"]);
 *   const chat = await Parley.startChat(cluster, { nickname: "Ann", subject: "My order" });
 *   const session = new Parley.ChatSession(cluster, chat, { event: (e) => ..., status: (s) => ... });
 *   session.start();
 *   session.send("Hello!");      // acknowledged (saved) when its `acked` handler says so
 *
 * - Every request goes to the current instance; when it cannot be reached or answers "try
 *   again" (408, 429, 5xx) the client moves to the next instance, waiting a random time up to
 *   an exponentially growing cap (full jitter), and tries again.
 * - Events arrive over a WebSocket after the last seq seen; when none can be opened (the
 *   instance is gone, or something on the way refuses WebSockets) one long poll after that
 *   seq takes its place, waiting through a failover like any request, then a socket again.
 *   Either way a stream served by another instance resumes exactly where the last one
 *   stopped: nothing missed, nothing twice. (A socket takes none of the six HTTP/1.1
 *   connections a browser opens to one origin: a console with many chats never runs out.)
 * - Messages are sent one after another, each with its client_msg_id, and resent with the
 *   same id until the server acknowledges it with a seq: a resend never stores it twice.
 *   Starting a chat and joining one carry a client_request_id the same way.
 * - Every answer names the instance that served the chat (Parley-Instance), so a page can
 *   show where its chat lives and that it was restored elsewhere.
 */
(function (global) {
  "use strict";
  if (global.Parley && global.Parley.Cluster) return;

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  /** A random UUID (v4); works outside secure contexts too. */
  function newId() {
    const b = new Uint8Array(16);
    global.crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  /** An answer the client will not retry, or the last problem when it gave up. */
  class ApiError extends Error {
    constructor(status, code, message, instance) {
      super(message || code);
      this.status = status;
      this.code = code;
      this.instance = instance;
    }
  }

  // Answers after which the same request may succeed later or elsewhere.
  const RETRY = new Set([408, 429, 500, 502, 503, 504]);

  class Cluster {
    /** `instances`: addresses of the cluster's instances (or one load balancer's). */
    constructor(instances, options = {}) {
      const list = (typeof instances === "string" ? instances.split(/[\s,]+/) : instances || []).map((s) => s.trim().replace(/\/+$/, "")).filter(Boolean);
      this.instances = list.length ? list : [global.location.origin];
      this.current = 0;
      this.baseDelayMs = options.baseDelayMs ?? 200;
      this.maxDelayMs = options.maxDelayMs ?? 5000;
      this.timeoutMs = options.timeoutMs ?? 15000;
    }

    /** Full jitter: a random wait up to base * 2^attempt, capped. */
    backoff(attempt) {
      return Math.random() * Math.min(this.maxDelayMs, this.baseDelayMs * 2 ** attempt);
    }

    /**
     * Sends one request, moving between instances until it is answered for good or
     * `attempts` ran out. Resolves to {status, body, instance}; rejects with ApiError.
     * `onRetry(problem)` is told each time the request is tried again.
     */
    async request(method, path, { token, body, timeoutMs, attempts = Infinity, onRetry, signal } = {}) {
      for (let attempt = 0; ; attempt++) {
        const base = this.instances[this.current];
        let problem;
        let wait = null;
        try {
          const answer = await this.once(base, method, path, token, body, timeoutMs ?? this.timeoutMs, signal);
          const error = answer.body && answer.body.error;
          if (!RETRY.has(answer.status)) {
            if (answer.status >= 400) throw new ApiError(answer.status, error ? error.code : "http_" + answer.status, error ? error.message : "", answer.instance);
            return answer;
          }
          problem = new ApiError(answer.status, error ? error.code : "http_" + answer.status, error ? error.message : "", answer.instance);
          // Rate limited: the same instance, after the time it named.
          if (answer.status === 429) wait = Number(answer.retryAfter || 1) * 1000;
        } catch (e) {
          if (e instanceof ApiError) throw e;
          if (signal && signal.aborted) throw new ApiError(0, "aborted", "stopped");
          problem = new ApiError(0, "unreachable", `${base} did not answer (${e.message || e})`);
        }
        if (attempt + 1 >= attempts) throw problem;
        if (wait === null) {
          this.current = (this.current + 1) % this.instances.length;
          wait = this.backoff(attempt);
        }
        if (onRetry) onRetry(problem, attempt);
        await sleep(wait);
        if (signal && signal.aborted) throw new ApiError(0, "aborted", "stopped");
      }
    }

    async once(base, method, path, token, body, timeoutMs, signal) {
      const ctl = new AbortController();
      const timer = setTimeout(() => ctl.abort(), timeoutMs);
      const stop = () => ctl.abort();
      if (signal) signal.addEventListener("abort", stop);
      try {
        const headers = {};
        if (token) headers.authorization = "Bearer " + token;
        if (body !== undefined) headers["content-type"] = "application/json";
        const res = await fetch(base + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), signal: ctl.signal, cache: "no-store" });
        const text = await res.text();
        let json = null;
        try {
          json = text ? JSON.parse(text) : null;
        } catch (_) {
          json = null;
        }
        return { status: res.status, body: json, instance: res.headers.get("parley-instance"), retryAfter: res.headers.get("retry-after") };
      } finally {
        clearTimeout(timer);
        if (signal) signal.removeEventListener("abort", stop);
      }
    }
  }

  /**
   * A customer starts a chat. Tried on a few instances: an instance that refuses (draining,
   * full) answers before creating anything, and every try carries the same client_request_id,
   * so a try whose answer was lost opened the very chat a later try answers with.
   */
  async function startChat(cluster, { nickname, subject = "", userData } = {}) {
    const body = { nickname, subject, client_request_id: newId() };
    if (userData) body.user_data = userData;
    const r = await cluster.request("POST", "/v1/chats", { body, attempts: 2 * cluster.instances.length + 2 });
    return { chatId: r.body.chat_id, participantId: r.body.participant_id, token: r.body.token, instance: r.instance };
  }

  /** What an agent does outside a chat: look at the queue and join chats. */
  class Agent {
    constructor(cluster, agentToken) {
      this.cluster = cluster;
      this.token = agentToken;
    }
    /** {chats: [{chat_id, nickname, subject, waiting_since, instance}], unreachable: [...]} */
    async queue() {
      const r = await this.cluster.request("GET", "/v1/queue", { token: this.token, attempts: this.cluster.instances.length + 1 });
      return r.body;
    }
    async join(chatId, nickname) {
      // One id for all tries: a retried join whose answer was lost adds no second agent.
      const body = { nickname, client_request_id: newId() };
      const r = await this.cluster.request("POST", `/v1/chats/${encodeURIComponent(chatId)}/join`, { token: this.token, body, attempts: this.cluster.instances.length + 2 });
      return { chatId, participantId: r.body.participant_id, token: r.body.token, instance: r.instance };
    }
  }

  /**
   * One participant's view of one chat: events in seq order, own messages sent in order and
   * acknowledged, the instance that serves the chat.
   * Handlers: event(e) for transcript events (and notices), typing(e), outbox(message) when a
   * message is queued, acked(message) when it was saved (state "sent") or refused ("failed"),
   * status(state, detail) with state "connecting" | "connected" | "reconnecting" |
   * "restored" | "closed" | "failed".
   */
  class ChatSession {
    constructor(cluster, { chatId, participantId, token }, handlers = {}) {
      this.cluster = cluster;
      this.chatId = chatId;
      this.participantId = participantId;
      this.token = token;
      this.on = handlers;
      this.after = 0;
      this.instance = null;
      this.state = "connecting";
      this.outbox = [];
      this.flushing = false;
      this.abort = new AbortController();
      this.path = `/v1/chats/${encodeURIComponent(chatId)}`;
    }

    start() {
      this.poll();
      return this;
    }

    /** Stops polling and sending (the chat goes on for the others). */
    stop() {
      this.abort.abort();
    }

    get stopped() {
      return this.abort.signal.aborted;
    }

    setStatus(state, detail) {
      this.state = state;
      if (this.on.status) this.on.status(state, detail);
    }

    /** A request was answered: note which instance serves the chat now. */
    answered(instance) {
      if (this.state === "closed" || this.state === "failed") return;
      const moved = instance && this.instance && instance !== this.instance;
      if (instance) this.instance = instance;
      if (moved) this.setStatus("restored", instance);
      else if (this.state !== "connected" && this.state !== "restored") this.setStatus("connected", this.instance);
    }

    retrying = (problem) => {
      if (this.state !== "closed" && this.state !== "failed") this.setStatus("reconnecting", problem.message);
    };

    /** Follows the chat's events until it closes or the session stops. */
    async poll() {
      for (let attempt = 0; !this.stopped && this.state !== "closed"; ) {
        const opened = Date.now();
        if (typeof global.WebSocket === "function" && (await this.socket())) {
          // A socket that ends at once again and again must not spin.
          attempt = Date.now() - opened < 1000 ? attempt + 1 : 0;
          if (attempt > 0) await sleep(this.cluster.backoff(attempt));
          continue;
        }
        if (this.stopped || this.state === "closed") return;
        if (!(await this.longPoll())) return;
      }
    }

    /** Reads one WebSocket on the current instance until it closes; whether it opened. */
    socket() {
      const base = this.cluster.instances[this.cluster.current];
      const url = `${base.replace(/^http/, "ws")}${this.path}/ws?after=${this.after}`;
      return new Promise((resolve) => {
        let ws;
        try {
          // The token rides as a subprotocol, not in the URL that proxies log.
          ws = new global.WebSocket(url, ["parley", "parley.token." + this.token]);
        } catch (_) {
          resolve(false);
          return;
        }
        let open = false;
        const stop = () => ws.close();
        this.abort.signal.addEventListener("abort", stop);
        ws.onopen = () => {
          open = true;
          this.look(base);
        };
        ws.onmessage = (m) => {
          let e;
          try {
            e = JSON.parse(m.data);
          } catch (_) {
            return;
          }
          this.deliver(e);
        };
        ws.onclose = () => {
          this.abort.signal.removeEventListener("abort", stop);
          if (open && !this.stopped && this.state !== "closed") this.retrying(new ApiError(0, "disconnected", `${base} ended the event stream`));
          resolve(open);
        };
      });
    }

    /**
     * A socket's handshake names no instance to a page: one events request that does not wait
     * tells which instance serves the chat now (and brings what happened meanwhile).
     */
    async look(base) {
      try {
        const r = await this.cluster.once(base, "GET", `${this.path}/events?after=${this.after}&wait_ms=0`, this.token, undefined, this.cluster.timeoutMs, this.abort.signal);
        if (r.status === 200) this.take(r);
      } catch (_) {
        // The socket itself says when the instance is gone.
      }
    }

    /** One long poll (moving between instances until one answers); false if it gave up. */
    async longPoll() {
      const asked = Date.now();
      let r;
      try {
        r = await this.cluster.request("GET", `${this.path}/events?after=${this.after}&wait_ms=25000`, {
          token: this.token,
          timeoutMs: 35000,
          signal: this.abort.signal,
          onRetry: this.retrying,
        });
      } catch (e) {
        if (!this.stopped) this.setStatus("failed", e.message);
        return false;
      }
      // A closed chat answers at once; never spin on empty answers.
      if (this.take(r) === 0 && Date.now() - asked < 1000) await sleep(1000);
      return true;
    }

    /** An answer to an events request: who served it, then its events; how many. */
    take(r) {
      this.answered(r.instance);
      const events = (r.body && r.body.events) || [];
      for (const e of events) this.deliver(e);
      return events.length;
    }

    deliver(e) {
      if (e.kind === "typing") {
        if (e.participant_id !== this.participantId && this.on.typing) this.on.typing(e);
        return;
      }
      if (e.seq === undefined) {
        if (this.on.event) this.on.event(e);
        return;
      }
      if (e.seq <= this.after) return; // seen already: a poll answered twice
      this.after = e.seq;
      if (this.on.event) this.on.event(e);
      if (e.kind === "closed") {
        this.setStatus("closed", e.text);
        this.stop();
      }
    }

    /** Queues a message; it is sent after the ones before it. Returns the outbox entry. */
    send(text) {
      const message = { clientMsgId: newId(), text, state: "sending", seq: null, error: null };
      this.outbox.push(message);
      if (this.on.outbox) this.on.outbox(message);
      this.flush();
      return message;
    }

    async flush() {
      if (this.flushing) return;
      this.flushing = true;
      try {
        for (;;) {
          const message = this.outbox.find((m) => m.state === "sending");
          if (!message || this.stopped) break;
          try {
            const r = await this.cluster.request("POST", `${this.path}/messages`, {
              token: this.token,
              body: { text: message.text, client_msg_id: message.clientMsgId },
              signal: this.abort.signal,
              onRetry: this.retrying,
            });
            message.seq = r.body.seq;
            message.state = "sent";
            this.answered(r.instance);
          } catch (e) {
            if (this.stopped && e.code === "aborted") break;
            message.state = "failed";
            message.error = e;
          }
          if (this.on.acked) this.on.acked(message);
        }
      } finally {
        this.flushing = false;
      }
    }

    /** Best effort: one try, no retry (a lost typing event harms no one). */
    typing(on) {
      this.cluster.request("POST", `${this.path}/typing`, { token: this.token, body: { typing: !!on }, attempts: 1, timeoutMs: 3000 }).catch(() => {});
    }

    async leave() {
      await this.cluster.request("POST", `${this.path}/leave`, { token: this.token, attempts: 2 * this.cluster.instances.length + 2 });
      this.stop();
    }

    /** An agent ends the chat for everyone; the closed event arrives with the others. */
    async close() {
      await this.cluster.request("POST", `${this.path}/close`, { token: this.token, body: {}, attempts: 2 * this.cluster.instances.length + 2 });
    }
  }

  global.Parley = { Cluster, ChatSession, Agent, ApiError, startChat, newId };
})(typeof window !== "undefined" ? window : globalThis);
