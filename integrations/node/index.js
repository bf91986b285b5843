'use strict';

// @sticky/socket.io: run Socket.IO workers behind `sticky run`.
//
//   const { setupWorker } = require('@sticky/socket.io');
//   setupWorker(io).listen(3000);
//
// - listen(): on the inherited socket (fd 3) under sticky, on the given
//   port otherwise, so the same program runs with and without sticky;
// - under sticky, setupWorker(io) alone listens (on the next turn of the
//   event loop, unless the program listened itself by then), as
//   @socket.io/sticky's setupWorker does: the worker half of a
//   @socket.io/sticky program runs unchanged;
// - every Engine.IO session is registered with sticky (`open <sid>` on
//   $STICKY_CONTROL, answered `ok` once the kernel routes that sid) inside
//   engine.io's async generateId, i.e. before its handshake answer leaves,
//   and unregistered (`close <sid>`) when the Engine.IO socket closes;
// - Engine.IO HTTP answers (long-polling, CORS preflights, errors) carry
//   `Connection: close`, so a TCP connection never carries requests of two
//   sessions: sticky places a connection by the sid of its first request,
//   and a keep-alive connection reused by another session would reach the
//   first session's worker. WebSocket upgrades are unaffected.

const { ControlClient, ControlError } = require('./lib/control');
const { activationFd, workerIndex } = require('./lib/activation');
const { createRelayAdapter } = require('./lib/relay-adapter');

const kSetup = Symbol.for('@sticky/socket.io.setup');

function defaultLogger() {
  return {
    warn: (msg) => process.stderr.write(`@sticky/socket.io (pid ${process.pid}): ${msg}\n`),
  };
}

/**
 * @param {import('socket.io').Server} io
 * @param {object} [options] see index.d.ts
 */
function setupWorker(io, options = {}) {
  if (!io || typeof io.path !== 'function' || !io.engine) {
    throw new TypeError(
      'setupWorker(io): expected a socket.io Server attached to an HTTP server ' +
        '(new Server(httpServer, ...))',
    );
  }
  if (io[kSetup]) throw new Error('setupWorker(io) was already called for this server');
  const env = options.env ?? process.env;
  const log = options.logger === false ? { warn() {} } : (options.logger ?? defaultLogger());
  const registerTimeout = options.registerTimeout ?? 3000;
  const controlPath = options.control !== undefined ? options.control : env.STICKY_CONTROL;
  const fd = activationFd(env);
  const engine = io.engine;
  const httpServer = io.httpServer ?? null;

  let control = null;
  if (controlPath) {
    control = new ControlClient(controlPath, { timeout: registerTimeout, ...options.controlOptions });
    control.on('disconnect', (err) =>
      log.warn(`control connection to ${controlPath} lost${err ? ` (${err.message})` : ''}; reconnecting`),
    );
    control.on('connect', () => {
      if (control.reconnections > 0) log.warn(`control connection to ${controlPath} restored`);
    });
    control.on('warning', (msg) => log.warn(msg));
  }

  // Registration, inside generateId: engine.io awaits it before creating the
  // transport, so the sid is routable before the handshake answer is written.
  const baseGenerateId = engine.generateId;
  engine.generateId = async function stickyGenerateId(req) {
    const id = await baseGenerateId.call(this, req);
    if (!control) return id;
    try {
      await control.open(id);
    } catch (err) {
      const websocket = req && req._query && req._query.transport === 'websocket';
      if (websocket) {
        // A WebSocket-only session lives on the connection it arrived on and
        // never needs routing: better served unregistered than refused.
        log.warn(`session ${id} not registered (${err.message}); serving it over its WebSocket anyway`);
        return id;
      }
      log.warn(`session ${id} not registered (${err.message}); refusing the handshake`);
      throw err;
    }
    // If the handshake fails after generateId (it then creates the socket
    // synchronously), no 'connection' follows: unregister.
    setImmediate(() => {
      if (!engine.clients[id]) unregister(id);
    });
    return id;
  };

  function unregister(id) {
    if (!control) return;
    control.close(id).catch((err) => log.warn(`close ${id}: ${err.message}`));
  }

  const onConnection = (socket) => socket.once('close', () => unregister(socket.id));
  engine.on('connection', onConnection);

  // Connection: close on every Engine.IO HTTP answer that is not a
  // WebSocket upgrade. The engine's 'headers' event covers handshakes and
  // every long-polling GET/POST answer; a 'request' listener ahead of
  // engine.io's also covers what never emits 'headers' (CORS preflights,
  // "Session ID unknown" and other error answers).
  // Still on where sticky resets a connection that carries another
  // worker's session (STICKY_FOREIGN_REQUESTS=reset): browsers resend the
  // request on a new connection, but socket.io-client in Node
  // (xmlhttprequest-ssl 2.1.2) does not complete a resent request, so a
  // Node client sharing a keep-alive agent would lose it. Browser-only
  // deployments may pass { closeConnections: false } (README: Requests on
  // reused connections).
  const closeConnections = options.closeConnections ?? true;
  let onRequest = null;
  let onHeaders = null;
  if (closeConnections) {
    const base = io.path().replace(/\/+$/, '');
    const isEngineUrl = (url) =>
      typeof url === 'string' &&
      url.startsWith(base) &&
      (url.length === base.length || url[base.length] === '/' || url[base.length] === '?');
    onHeaders = (headers, req) => {
      if (!req.headers.upgrade) headers.Connection = 'close';
    };
    engine.on('headers', onHeaders);
    if (httpServer) {
      onRequest = (req, res) => {
        if (isEngineUrl(req.url)) res.setHeader('Connection', 'close');
      };
      httpServer.prependListener('request', onRequest);
    }
  }

  let listening = null; // the promise of the first listen()
  const worker = {
    /** True when this process got its listening socket from sticky. */
    activated: fd !== null,
    /** STICKY_WORKER, or null outside sticky. */
    worker: workerIndex(env),
    /** The control client, or null without STICKY_CONTROL. */
    control,
    /**
     * Listens on the inherited socket under sticky, else on port/host
     * (default: $PORT or 3000). Resolves with the bound address.
     */
    listen(port, host, callback) {
      if (typeof port === 'function') [port, host, callback] = [undefined, undefined, port];
      if (typeof host === 'function') [host, callback] = [undefined, host];
      if (!httpServer) {
        throw new Error('setupWorker(io).listen(): io has no httpServer (create it with new Server(httpServer))');
      }
      // Listening twice (an explicit listen() after the automatic one) is
      // the same listen.
      if (listening) {
        return callback ? listening.then((address) => (callback(address), address)) : listening;
      }
      const target =
        fd !== null
          ? { fd }
          : { port: port ?? Number(env.PORT ?? 3000), ...(host !== undefined ? { host } : {}) };
      listening = new Promise((resolve, reject) => {
        const onError = (err) => {
          httpServer.off('listening', onListening);
          reject(err);
        };
        const onListening = () => {
          httpServer.off('error', onError);
          const address = httpServer.address();
          if (callback) callback(address);
          resolve(address);
        };
        httpServer.once('error', onError);
        httpServer.once('listening', onListening);
        httpServer.listen(target);
      });
      return listening;
    },
    /** Undoes setupWorker's hooks and closes the control connection. */
    close() {
      engine.generateId = baseGenerateId;
      engine.off('connection', onConnection);
      if (onHeaders) engine.off('headers', onHeaders);
      if (onRequest) httpServer.off('request', onRequest);
      if (control) control.destroy();
      delete io[kSetup];
    },
  };
  io[kSetup] = worker;
  const autoListen = options.listen ?? true;
  if (fd !== null && httpServer && autoListen) {
    setImmediate(() => {
      if (listening || httpServer.listening || !io[kSetup]) return;
      worker.listen().catch((err) => {
        log.warn(`cannot listen on the inherited socket (fd ${fd}): ${err.message}`);
        process.exitCode = 1;
        process.exit();
      });
    });
  }
  return worker;
}

module.exports = { setupWorker, createRelayAdapter, ControlClient, ControlError, activationFd, workerIndex };
