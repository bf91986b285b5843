'use strict';

// A client for sticky's control socket: one persistent unix stream
// connection, newline-terminated request lines, one answer line per request,
// in order (`ok[ <text>]` or `err <reason>`).
//
// Every command a worker sends (`open <sid>`, `close <sid>`, `stats`) is
// idempotent, so a request whose answer was lost with the connection is
// simply sent again on the next one. While disconnected, requests wait
// (up to their timeout) and the client reconnects with backoff.

const net = require('node:net');
const { EventEmitter } = require('node:events');

const DEFAULTS = {
  timeout: 3000, // ms a request may wait for its answer, reconnections included
  backoffMin: 50, // ms before the first reconnection attempt
  backoffMax: 2000, // ms, cap of the doubling backoff
};

class ControlError extends Error {
  constructor(message, line) {
    super(message);
    this.name = 'ControlError';
    this.line = line;
  }
}

class ControlClient extends EventEmitter {
  /**
   * @param {string} path unix socket path (normally process.env.STICKY_CONTROL)
   * @param {{timeout?: number, backoffMin?: number, backoffMax?: number}} [options]
   */
  constructor(path, options = {}) {
    super();
    if (typeof path !== 'string' || path === '') {
      throw new TypeError('ControlClient: a control socket path is required');
    }
    this.path = path;
    this.options = { ...DEFAULTS, ...options };
    this._socket = null;
    this._connected = false;
    this._destroyed = false;
    this._waiting = []; // requests not written on the current connection yet
    this._inflight = []; // requests written, answers expected in this order
    this._buffer = '';
    this._backoff = this.options.backoffMin;
    this._reconnectTimer = null;
    this._everConnected = false;
    this.reconnections = 0;
    this._connect();
  }

  /** True while a control connection is established. */
  get connected() {
    return this._connected;
  }

  /** Registers a session id with this worker. */
  open(sid, options) {
    return this.request(`open ${sid}`, options).then(() => undefined);
  }

  /** Unregisters a session id. */
  close(sid, options) {
    return this.request(`close ${sid}`, options).then(() => undefined);
  }

  /** The supervisor's counters, as the text after `ok `. */
  stats(options) {
    return this.request('stats', options);
  }

  /**
   * Sends one line; resolves with the text after `ok` (possibly ''), rejects
   * with a ControlError carrying the reason of an `err` answer, or on timeout.
   */
  request(line, options = {}) {
    if (typeof line !== 'string' || line.includes('\n')) {
      return Promise.reject(new TypeError('ControlClient: a request is one line without "\\n"'));
    }
    if (this._destroyed) {
      return Promise.reject(new ControlError('control client destroyed', line));
    }
    const timeout = options.timeout ?? this.options.timeout;
    return new Promise((resolve, reject) => {
      const req = { line, resolve, reject, done: false, timer: null };
      if (timeout > 0 && Number.isFinite(timeout)) {
        req.timer = setTimeout(() => {
          const why = this._connected
            ? `no answer within ${timeout} ms`
            : `control socket ${this.path} unreachable for ${timeout} ms`;
          this._settle(req, new ControlError(`${line}: ${why}`, line));
          // A request still waiting is dropped; one in flight keeps its
          // place so that later answers stay matched to their requests.
          const i = this._waiting.indexOf(req);
          if (i >= 0) this._waiting.splice(i, 1);
        }, timeout);
      }
      this._waiting.push(req);
      this._flush();
      this._refresh();
    });
  }

  /** Closes the connection; pending and later requests fail. */
  destroy() {
    if (this._destroyed) return;
    this._destroyed = true;
    clearTimeout(this._reconnectTimer);
    const err = new ControlError('control client destroyed');
    for (const req of [...this._inflight, ...this._waiting]) this._settle(req, err);
    this._inflight = [];
    this._waiting = [];
    if (this._socket) this._socket.destroy();
    this._socket = null;
    this._connected = false;
  }

  _settle(req, err, value) {
    if (req.done) return;
    req.done = true;
    clearTimeout(req.timer);
    if (err) req.reject(err);
    else req.resolve(value);
  }

  _connect() {
    if (this._destroyed) return;
    this._reconnectTimer = null;
    const socket = net.createConnection(this.path);
    this._socket = socket;
    this._buffer = '';
    socket.setEncoding('utf8');
    socket.on('connect', () => {
      if (socket !== this._socket) return;
      this._connected = true;
      this._backoff = this.options.backoffMin;
      if (this._everConnected) this.reconnections++;
      this._everConnected = true;
      this.emit('connect');
      this._flush();
      this._refresh();
    });
    socket.on('data', (chunk) => {
      if (socket === this._socket) this._onData(chunk);
    });
    socket.on('error', (err) => {
      // 'close' follows; keep the reason for it.
      socket._stickyError = err;
    });
    socket.on('close', () => {
      if (socket !== this._socket) return;
      this._onClose(socket._stickyError);
    });
  }

  _onData(chunk) {
    this._buffer += chunk;
    let nl;
    while ((nl = this._buffer.indexOf('\n')) >= 0) {
      const answer = this._buffer.slice(0, nl).replace(/\r$/, '');
      this._buffer = this._buffer.slice(nl + 1);
      const req = this._inflight.shift();
      if (!req) {
        this.emit('warning', `unexpected answer from sticky: ${answer}`);
        continue;
      }
      if (answer === 'ok' || answer.startsWith('ok ')) {
        this._settle(req, null, answer.slice(3));
      } else if (answer.startsWith('err ') && /reconnect/.test(answer)) {
        // e.g. "err worker restarted; reconnect": this connection is stale.
        if (!req.done) this._waiting.unshift(req);
        this._socket.destroy();
        return;
      } else {
        const reason = answer.startsWith('err ') ? answer.slice(4) : `unexpected answer: ${answer}`;
        this._settle(req, new ControlError(`${req.line}: ${reason}`, req.line));
      }
    }
    this._refresh();
  }

  _onClose(err) {
    const wasConnected = this._connected;
    this._connected = false;
    this._socket = null;
    // Answers lost with the connection: send those requests again (every
    // command is idempotent), ahead of the ones not written yet.
    const resend = this._inflight.filter((r) => !r.done);
    this._inflight = [];
    this._waiting = [...resend, ...this._waiting];
    if (this._destroyed) return;
    if (wasConnected) this.emit('disconnect', err);
    const delay = this._backoff;
    this._backoff = Math.min(this._backoff * 2, this.options.backoffMax);
    this._reconnectTimer = setTimeout(() => this._connect(), delay);
    this._refresh();
  }

  _flush() {
    if (!this._connected || this._waiting.length === 0) return;
    const reqs = this._waiting.filter((r) => !r.done);
    this._waiting = [];
    if (reqs.length === 0) return;
    this._inflight.push(...reqs);
    this._socket.write(reqs.map((r) => r.line + '\n').join(''));
  }

  // Pending requests keep the process alive; an idle control connection
  // (or its reconnection timer) does not.
  _refresh() {
    const busy = this._inflight.some((r) => !r.done) || this._waiting.length > 0;
    if (this._socket) {
      if (busy) this._socket.ref();
      else this._socket.unref();
    }
    if (this._reconnectTimer) {
      if (busy) this._reconnectTimer.ref();
      else this._reconnectTimer.unref();
    }
  }
}

module.exports = { ControlClient, ControlError };
