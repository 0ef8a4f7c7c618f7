// The room page's client: one socket, the replica that serves it on screen,
// and reconnection with jittered exponential backoff, so a fleet of browsers
// does not reconnect in lockstep when a replica drains or dies.
(function () {
  "use strict";
  const room = JSON.parse(document.getElementById("room-name").textContent);
  const statusEl = document.getElementById("status");
  const servedByEl = document.getElementById("served-by");
  const log = document.getElementById("log");
  const form = document.getElementById("send");
  const input = document.getElementById("message");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const url = `${scheme}://${location.host}/ws/chat/${encodeURIComponent(room)}/`;
  const BASE_DELAY_MS = 500, MAX_DELAY_MS = 15000;
  let attempt = 0, socket = null;

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

  function connect() {
    setStatus("connecting", "connecting…");
    socket = new WebSocket(url);
    socket.onopen = () => { attempt = 0; };
    socket.onmessage = (event) => {
      const frame = JSON.parse(event.data);
      if (frame.type === "welcome") {
        servedByEl.textContent = frame.pod;
        setStatus("open", "connected");
      } else if (frame.type === "chat.message") {
        append(frame.message, `${frame.origin} → ${frame.served_by}`);
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
