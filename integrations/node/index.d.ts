import type { EventEmitter } from 'node:events';
import type { AddressInfo } from 'node:net';
import type { Server } from 'socket.io';

export interface ControlClientOptions {
  /** ms a request may wait for its answer, reconnections included. Default 3000. */
  timeout?: number;
  /** ms before the first reconnection attempt; doubles up to backoffMax. Default 50. */
  backoffMin?: number;
  /** Default 2000. */
  backoffMax?: number;
}

export interface RequestOptions {
  /** Overrides the client's timeout for this request (0 or Infinity: none). */
  timeout?: number;
}

/** An `err <reason>` answer, a timeout, or a destroyed client. */
export class ControlError extends Error {
  name: 'ControlError';
  /** The request line, when the error belongs to one. */
  line?: string;
}

/**
 * A persistent connection to sticky's control socket ($STICKY_CONTROL).
 * Requests are lines, answered in order by `ok[ text]` or `err reason`.
 * Reconnects with backoff when the connection drops; requests wait for the
 * next connection (up to their timeout) and requests whose answer was lost
 * are sent again (every command is idempotent).
 *
 * Events: 'connect', 'disconnect' (err?), 'warning' (message).
 */
export class ControlClient extends EventEmitter {
  constructor(path: string, options?: ControlClientOptions);
  readonly path: string;
  readonly connected: boolean;
  /** Times the connection was re-established after a drop. */
  readonly reconnections: number;
  /** `open <sid>`: resolves once sticky routes the sid to this worker. */
  open(sid: string, options?: RequestOptions): Promise<void>;
  /** `close <sid>`. */
  close(sid: string, options?: RequestOptions): Promise<void>;
  /** `stats`: resolves with the text after `ok `. */
  stats(options?: RequestOptions): Promise<string>;
  /** Any request line; resolves with the text after `ok` ('' if none). */
  request(line: string, options?: RequestOptions): Promise<string>;
  /** Closes the connection; pending and later requests are rejected. */
  destroy(): void;
}

export interface Logger {
  warn(message: string): void;
}

export interface SetupWorkerOptions {
  /**
   * Control socket path. Default: process.env.STICKY_CONTROL. Without one
   * (not under sticky), sessions are not registered.
   */
  control?: string | null;
  /**
   * ms a registration may wait (for an answer, or for the control connection
   * to come back) before the handshake is refused with HTTP 400, so the
   * client retries. WebSocket-only handshakes are served unregistered
   * instead: they never need routing. Default 3000.
   */
  registerTimeout?: number;
  /** Backoff settings of the control connection. */
  controlOptions?: Omit<ControlClientOptions, 'timeout'>;
  /**
   * Send `Connection: close` with every Engine.IO HTTP answer (long-polling,
   * CORS preflights, errors), so no TCP connection carries requests of two
   * sessions. Default true. Turning it off breaks stickiness for clients
   * that reuse connections across sessions (browsers share them between tabs).
   */
  closeConnections?: boolean;
  /** Where warnings go. Default: stderr. false: nowhere. */
  logger?: Logger | false;
  /**
   * Under sticky, listen on the inherited socket on the next turn of the
   * event loop unless the program has listened by then (what the worker
   * half of a @socket.io/sticky program expects). Default true.
   */
  listen?: boolean;
  /** Environment to read LISTEN_FDS, LISTEN_PID, STICKY_WORKER, PORT from. Default process.env. */
  env?: NodeJS.ProcessEnv;
}

export interface StickyWorker {
  /** True when sticky handed this process its listening socket (fd 3). */
  readonly activated: boolean;
  /** STICKY_WORKER (0-based), or null outside sticky. */
  readonly worker: number | null;
  /** The control connection, or null without STICKY_CONTROL. */
  readonly control: ControlClient | null;
  /**
   * Makes io.httpServer listen: on the inherited socket under sticky (port
   * and host are then ignored), else on port (default $PORT or 3000) and
   * host (default: Node's, all interfaces). Resolves with the address.
   * A second call (e.g. after the automatic listen) is the same listen.
   */
  listen(port?: number, host?: string, callback?: (address: AddressInfo | string | null) => void): Promise<AddressInfo | string | null>;
  listen(callback: (address: AddressInfo | string | null) => void): Promise<AddressInfo | string | null>;
  /** Removes the hooks and closes the control connection. */
  close(): void;
}

/**
 * Prepares a socket.io Server (attached to an HTTP server) to run as a
 * sticky worker. Call it after any custom `io.engine.generateId`.
 */
export function setupWorker(io: Server, options?: SetupWorkerOptions): StickyWorker;

/** fd 3 when this process was socket-activated (LISTEN_FDS >= 1, LISTEN_PID = pid), else null. */
export function activationFd(env?: NodeJS.ProcessEnv, pid?: number): number | null;

/** STICKY_WORKER as a number, or null. */
export function workerIndex(env?: NodeJS.ProcessEnv): number | null;
