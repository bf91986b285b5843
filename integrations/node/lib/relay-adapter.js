'use strict';

// A socket.io adapter over sticky's relay socket ($STICKY_RELAY): like
// @socket.io/cluster-adapter (the same ClusterAdapterWithHeartbeat base,
// the same messages), but over the relay's pub/sub instead of Node IPC, so
// it needs no IPC channel (any wrapper, any `--ipc`) and survives an
// adoption: a lost connection is retried every 500 ms and subscribed
// again. Messages are V8-serialized (Buffers survive).
//
// Channels: `sio#<nsp>` for what every server gets, `sio#<nsp>#<uid>` for
// the responses to one server. Wire protocol: README, "Broadcasting
// between workers".

const net = require('node:net');
const v8 = require('node:v8');
const { createRequire } = require('node:module');

const RETRY_MS = 500;

/** socket.io-adapter as the application sees it (a dependency of socket.io). */
function adapterModule() {
  const from = require.main && require.main.filename ? createRequire(require.main.filename) : require;
  try {
    return from('socket.io-adapter');
  } catch {
    return require('socket.io-adapter');
  }
}

function frame(op, ...parts) {
  const body = Buffer.concat([Buffer.from([op]), ...parts]);
  const len = Buffer.alloc(4);
  len.writeUInt32BE(body.length);
  return Buffer.concat([len, body]);
}

/** One relay connection per process, shared by every namespace's adapter. */
class RelayConnection {
  constructor(path, log) {
    this.path = path;
    this.log = log;
    this.handlers = new Map(); // channel -> (payload Buffer) => void
    this.wills = []; // [channel, payload]
    this.socket = null;
    this.buffer = Buffer.alloc(0);
    this.announced = false;
    this.connect();
  }

  // Writes made while a connection is being set up are buffered by Node
  // and go out once it is: nothing published at start-up (the adapters'
  // first heartbeat) is lost. A new connection after a lost one sends the
  // subscriptions and wills again.
  connect(again = false) {
    const socket = net.connect(this.path);
    this.socket = socket;
    socket.unref();
    if (again) {
      for (const channel of this.handlers.keys()) socket.write(frame(0x73, Buffer.from(channel)));
      for (const [channel, payload] of this.wills) this.send(0x77, channel, payload);
    }
    socket.on('connect', () => {
      if (this.announced) this.log.warn(`relay ${this.path} reached again`);
      this.announced = false;
    });
    socket.on('data', (d) => this.onData(d));
    socket.on('error', (err) => {
      if (!this.announced) this.log.warn(`relay ${this.path}: ${err.message}; retrying every ${RETRY_MS} ms`);
      this.announced = true;
    });
    socket.on('close', () => {
      this.socket = null;
      this.buffer = Buffer.alloc(0);
      setTimeout(() => this.connect(true), RETRY_MS).unref();
    });
  }

  onData(d) {
    this.buffer = this.buffer.length ? Buffer.concat([this.buffer, d]) : d;
    while (this.buffer.length >= 4) {
      const n = this.buffer.readUInt32BE(0);
      if (this.buffer.length < 4 + n) break;
      const body = this.buffer.subarray(4, 4 + n);
      this.buffer = this.buffer.subarray(4 + n);
      if (body[0] === 0x6d /* m */) {
        const clen = body.readUInt16BE(1);
        const channel = body.toString('utf8', 3, 3 + clen);
        const handler = this.handlers.get(channel);
        if (handler) handler(body.subarray(3 + clen));
      } else if (body[0] === 0x65 /* e */) {
        this.log.warn(`relay ${this.path} refused: ${body.toString('utf8', 1)}`);
      }
    }
  }

  subscribe(channel, handler) {
    this.handlers.set(channel, handler);
    if (this.socket) this.socket.write(frame(0x73, Buffer.from(channel)));
  }

  unsubscribe(channel) {
    this.handlers.delete(channel);
    if (this.socket) this.socket.write(frame(0x75, Buffer.from(channel)));
  }

  publish(channel, payload) {
    return this.send(0x70, channel, payload);
  }

  /** A message sticky publishes when this connection ends (set again on reconnects). */
  will(channel, payload) {
    this.wills.push([channel, payload]);
    this.send(0x77, channel, payload);
  }

  send(op, channel, payload) {
    if (!this.socket) return false;
    const c = Buffer.from(channel);
    const clen = Buffer.alloc(2);
    clen.writeUInt16BE(c.length);
    return this.socket.write(frame(op, clen, c, payload));
  }
}

let shared = null;

/**
 * @param {object} [opts] ClusterAdapterWithHeartbeat options
 *   (heartbeatInterval, heartbeatTimeout), plus `path` (default
 *   $STICKY_RELAY) and `logger` ({ warn }).
 */
function createRelayAdapter(opts = {}) {
  const path = opts.path ?? process.env.STICKY_RELAY;
  if (!path) {
    throw new Error('createRelayAdapter(): no relay socket: run under `sticky run` (it sets STICKY_RELAY) or pass { path }');
  }
  const log = opts.logger ?? { warn: (m) => process.stderr.write(`@sticky/socket.io (pid ${process.pid}): ${m}\n`) };
  const { ClusterAdapterWithHeartbeat } = adapterModule();

  class RelayAdapter extends ClusterAdapterWithHeartbeat {
    constructor(nsp) {
      super(nsp, opts);
      if (!shared || shared.path !== path) shared = new RelayConnection(path, log);
      this.relay = shared;
      this.channel = `sio#${nsp.name}`;
      this.ownChannel = `${this.channel}#${this.uid}`;
      const onPayload = (payload) => {
        let message;
        try {
          message = v8.deserialize(payload);
        } catch (err) {
          return log.warn(`relay: a message did not deserialize: ${err.message}`);
        }
        // As @socket.io/cluster-adapter: onMessage() takes responses too,
        // and skips what this adapter published itself.
        if (message && message.nsp === this.nsp.name) this.onMessage(message);
      };
      this.relay.subscribe(this.channel, onPayload);
      this.relay.subscribe(this.ownChannel, onPayload);
      // Published by sticky if this process dies: the ADAPTER_CLOSE its
      // close() would send, so the others stop waiting for its answers.
      const close = { type: adapterModule().MessageType.ADAPTER_CLOSE, uid: this.uid, nsp: nsp.name };
      this.relay.will(this.channel, v8.serialize(close));
      this.init();
    }

    doPublish(message) {
      this.relay.publish(this.channel, v8.serialize(message));
      return Promise.resolve(''); // connection state recovery is not supported
    }

    doPublishResponse(requesterUid, response) {
      response.requesterUid = requesterUid;
      this.relay.publish(`${this.channel}#${requesterUid}`, v8.serialize(response));
      return Promise.resolve();
    }

    close() {
      super.close();
      this.relay.unsubscribe(this.channel);
      this.relay.unsubscribe(this.ownChannel);
    }
  }
  // socket.io calls it with `new`: a function, not an arrow.
  return function relayAdapter(nsp) {
    return new RelayAdapter(nsp);
  };
}

module.exports = { createRelayAdapter };
