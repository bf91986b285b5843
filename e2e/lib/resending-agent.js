'use strict';

// A keep-alive http.Agent that does what browsers do when a reused
// keep-alive connection is reset before any answer byte: it sends the same
// request again (GET and POST alike). Node's http client leaves that to the
// application (`req.reusedSocket`, see Node's docs on keep-alive resets), so
// engine.io-client on Node reports such a reset as a transport error and
// the session disconnects. sticky resets a reused connection that carries
// another worker's session (README, "Requests on reused connections").
//
// It also records every answer's status, so that tests can assert that no
// Engine.IO request got a 4xx/5xx.

const http = require('node:http');

const MAX_RESENDS = 20;

class ResendingAgent extends http.Agent {
  constructor(options = {}) {
    super({ keepAlive: true, ...options });
    this.resends = 0;
    this.statuses = [];
    this.socketsCreated = 0;
  }

  createConnection(...args) {
    this.socketsCreated++;
    return super.createConnection(...args);
  }

  addRequest(req, options) {
    if (!req.stickyWatched) watch(this, req, options, this.resendAttempt || 0);
    this.resendAttempt = 0;
    return super.addRequest(req, options);
  }
}

/** Buffers the body `req` sends and resends it when `req` is reset unanswered. */
function watch(agent, req, options, attempt) {
  req.stickyWatched = true;
  const chunks = [];
  const write = req.write.bind(req);
  const end = req.end.bind(req);
  req.write = (chunk, ...rest) => {
    if (chunk && typeof chunk !== 'function') chunks.push(Buffer.from(chunk));
    return write(chunk, ...rest);
  };
  req.end = (chunk, ...rest) => {
    if (chunk && typeof chunk !== 'function') chunks.push(Buffer.from(chunk));
    return end(chunk, ...rest);
  };
  if (attempt === 0) req.on('response', (res) => agent.statuses.push(res.statusCode));
  const emit = req.emit.bind(req);
  req.emit = (event, ...args) => {
    const err = args[0];
    const resettable = event === 'error' && req.reusedSocket && !req.res && err && err.code === 'ECONNRESET';
    if (!resettable || attempt >= MAX_RESENDS) return emit(event, ...args);
    agent.resends++;
    agent.resendAttempt = attempt + 1; // read by addRequest, inside http.request
    const again = http.request({
      host: options.host,
      port: options.port,
      method: req.method,
      path: req.path,
      headers: req.getHeaders(),
      agent,
    });
    // The caller listens on `req`: hand it the resend's answer or failure.
    again.on('response', (res) => emit('response', res));
    again.on('error', (e) => emit('error', e));
    again.end(Buffer.concat(chunks));
    return true;
  };
}

module.exports = { ResendingAgent };
