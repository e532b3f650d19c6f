// Following a task's events (GET v1/tasks/{id}/events, Server-Sent Events).
//
// Without an API key, an EventSource does it (it reconnects with Last-Event-ID by
// itself). An EventSource cannot send an Authorization header, so with a key the
// stream is read with fetch() instead, parsed here, and resumed with ?after=<last id>.
//
// A stream ends after the task's last event, and a task that ended before anyone
// followed it may have no events at all: its stream is empty. Either way, a stream
// that closes is the end when the task is final (isFinal()), else a drop to recover.

import { ApiError, apiKey, authHeaders, errorOf, url } from "./api.js";

const KINDS = ["progress", "log", "event", "done", "redriven"];
const RETRY_MS = 1000;

/** handlers: onEvent(event), onStatus(text), isFinal() -> Promise<boolean>. */
export function follow(taskId, handlers) {
  return apiKey() ? new FetchFollower(taskId, handlers) : new SourceFollower(taskId, handlers);
}

function eventsUrl(taskId, after) {
  return url(`v1/tasks/${encodeURIComponent(taskId)}/events`, { after });
}

class SourceFollower {
  constructor(taskId, handlers) {
    this.mode = "EventSource";
    this.handlers = handlers;
    this.source = new EventSource(eventsUrl(taskId));
    this.source.onopen = () => handlers.onStatus("live");
    const deliver = (message) => handlers.onEvent(JSON.parse(message.data));
    for (const kind of KINDS) this.source.addEventListener(kind, deliver);
    this.source.onmessage = deliver; // an event of a kind not listed above
    this.source.addEventListener("error", (e) => this.failed(e));
  }

  async failed(message) {
    const { onStatus, isFinal } = this.handlers;
    if (message.data) { // the gateway's own 'error' event: the engine failed mid-stream
      const error = JSON.parse(message.data);
      onStatus(`reconnecting after ${error.type}: ${error.message}`);
    } else if (this.source.readyState === EventSource.CLOSED) {
      onStatus("closed: the gateway refused the stream");
    } else if (await isFinal().catch(() => false)) {
      this.close();
      onStatus("ended");
    } else {
      onStatus("reconnecting");
    }
  }

  close() {
    this.source.close();
  }
}

class FetchFollower {
  constructor(taskId, handlers) {
    this.mode = "fetch stream";
    this.taskId = taskId;
    this.handlers = handlers;
    this.last = null;
    this.abort = new AbortController();
    this.run();
  }

  async run() {
    const { onStatus, isFinal } = this.handlers;
    const signal = this.abort.signal;
    while (!signal.aborted) {
      try {
        await this.read(signal);
        if (await isFinal()) return onStatus("ended");
        onStatus("reconnecting");
      } catch (error) {
        if (signal.aborted) return;
        if (error instanceof ApiError && error.status >= 400 && error.status < 500 && error.status !== 429) {
          return onStatus(`closed: ${error.text}`);
        }
        onStatus(`reconnecting after ${error instanceof ApiError ? error.text : error.message}`);
      }
      await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
    }
  }

  async read(signal) {
    const response = await fetch(eventsUrl(this.taskId, this.last), {
      headers: { Accept: "text/event-stream", ...authHeaders() }, signal, cache: "no-store",
    });
    if (!response.ok) throw await errorOf(response);
    this.handlers.onStatus("live");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      const blocks = (buffer + value).split(/\r?\n\r?\n/);
      buffer = blocks.pop();
      for (const block of blocks) this.dispatch(parse(block));
    }
  }

  dispatch({ id, event, data }) {
    if (data === undefined) return; // a comment (keep-alive) or a 'retry:' line
    if (event === "error") {
      const error = JSON.parse(data);
      throw new ApiError(503, error.type, error.message);
    }
    if (id) this.last = id;
    this.handlers.onEvent(JSON.parse(data));
  }

  close() {
    this.abort.abort();
  }
}

/** One SSE event block: its id, event name and data (lines joined), per the SSE format. */
function parse(block) {
  const out = {};
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") out.data = out.data === undefined ? value : `${out.data}\n${value}`;
    else if (field === "id" || field === "event") out[field] = value;
  }
  return out;
}
