// The room page's client: one socket, the replica that serves it on screen,
// and reconnection with jittered exponential backoff, so a fleet of browsers
// does not reconnect in lockstep when a replica drains or dies. It resumes
// from the last message it showed (?epoch=&offset=): the server replays what
// was missed, or says that it cannot (recovered: false), and the page says so.
(function () {
  "use strict";
  const room = JSON.parse(document.getElementById("room-name").textContent);
  const statusEl = document.getElementById("status");
  const servedByEl = document.getElementById("served-by");
  const log = document.getElementById("log");
  const form = document.getElementById("send");
  const input = document.getElementById("message");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const base = `${scheme}://${location.host}/ws/chat/${encodeURIComponent(room)}/`;
  const BASE_DELAY_MS = 500, MAX_DELAY_MS = 15000;
  let attempt = 0, socket = null;
  // The room's position as this page last saw it: where a reconnect resumes.
  let epoch = null, offset = null;

  function setStatus(state, text) { statusEl.dataset.state = state; statusEl.textContent = text; }

  function append(text, meta, cls) {
    const li = document.createElement("li");
    if (cls) li.className = cls;
    li.textContent = text;
    if (meta) { const span = document.createElement("span"); span.className = "meta"; span.textContent = meta; li.appendChild(span); }
    log.appendChild(li);
    li.scrollIntoView({ block: "nearest" });
  }

  function newId() {
    // crypto.randomUUID exists only in secure contexts (https or localhost).
    return window.crypto && crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(36).slice(2)}`;
  }

  function backoff() {
    // "Full jitter": a random delay up to the exponential cap.
    const cap = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** attempt);
    attempt += 1;
    return Math.random() * cap;
  }

  function url() {
    return epoch === null ? base : `${base}?epoch=${encodeURIComponent(epoch)}&offset=${offset}`;
  }

  function welcomed(frame) {
    if (frame.recovered === true && frame.replayed > 0) {
      append(`reconnected: recovered ${frame.replayed} missed message${frame.replayed === 1 ? "" : "s"}`, null, "notice");
    } else if (frame.recovered === false) {
      append("reconnected: some messages may be missing", null, "error");
    }
    // With a replay coming, each replayed message moves the position: a
    // socket lost mid-replay then resumes from the last one shown.
    if (frame.epoch !== undefined && !frame.replayed) { epoch = frame.epoch; offset = frame.offset; }
  }

  function connect() {
    setStatus("connecting", "connecting…");
    socket = new WebSocket(url());
    socket.onopen = () => { attempt = 0; };
    socket.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === "welcome") {
        servedByEl.textContent = frame.pod;
        setStatus("open", "connected");
        welcomed(frame);
      } else if (frame.type === "chat.message") {
        append(frame.message, `${frame.origin} → ${frame.served_by}`);
        if (frame.epoch !== undefined) { epoch = frame.epoch; offset = frame.offset; }
      } else if (frame.type === "error") {
        append(`error ${frame.code}: ${frame.detail}`, null, "error");
      }
    };
    socket.onclose = (event) => {
      const delay = backoff();
      setStatus("closed", `disconnected (${event.code}), retrying in ${(delay / 1000).toFixed(1)} s`);
      setTimeout(connect, delay);
    };
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!socket || socket.readyState !== WebSocket.OPEN || !input.value) return;
    socket.send(JSON.stringify({ message: input.value, id: newId(), sent_at: Date.now() }));
    input.value = "";
  });

  connect();
})();
