'use strict';

// The Socket.IO worker of `cargo xtask bench`, and the Node.js peers it runs
// behind. Every variant runs the same application (`app()` below); only how
// connections reach it differs:
//
//   node server.js worker          one worker: the socket sticky hands over
//                                  (fd 3) when socket-activated, else a free
//                                  port on 127.0.0.1 (nginx's upstreams)
//   node server.js sticky-master N PORT
//                                  @socket.io/sticky 1.0.4 on Node's cluster:
//                                  the primary reads each connection's first
//                                  chunk and passes it to the sid's worker;
//                                  @socket.io/cluster-adapter between workers
//   node server.js floor N PORT    Node's cluster with SCHED_NONE: every worker
//                                  accepts from one shared listening socket,
//                                  no stickiness at all
//
// Once serving, the process prints one line `ready PORT` on stdout (for
// `worker` outside sticky: the port it listens on).
//
// The application: Socket.IO 4 at /socket.io/, `echo` and `whoami` events
// with acks, and every HTTP answer carries `X-Worker-Pid` so that the load
// generator can tell which process answered. (A request carrying the sid of
// a session that another process owns gets Engine.IO's own 400 "Session ID
// unknown": that is how wrong-worker answers are counted for every variant.)

const cluster = require('node:cluster');
const http = require('node:http');
const { Server } = require('socket.io');

function app() {
  const httpServer = http.createServer();
  const io = new Server(httpServer, { cors: { origin: '*' } });
  // After Server(): engine.io wraps the request listeners present then.
  httpServer.prependListener('request', (req, res) => res.setHeader('X-Worker-Pid', process.pid));
  const me = { pid: process.pid };
  io.on('connection', (socket) => {
    socket.on('echo', (payload, ack) => {
      if (typeof ack === 'function') ack(payload);
    });
    socket.on('whoami', (ack) => {
      if (typeof ack === 'function') ack(me);
    });
  });
  return { httpServer, io };
}

function ready(port) {
  process.stdout.write(`ready ${port}\n`);
}

function worker() {
  const { httpServer } = app();
  const activated = process.env.LISTEN_FDS === '1' && Number(process.env.LISTEN_PID) === process.pid;
  httpServer.listen(activated ? { fd: 3 } : { port: 0, host: '127.0.0.1' }, () => {
    ready(httpServer.address().port);
  });
}

function stickyMaster(workers, port) {
  if (cluster.isPrimary) {
    const { setupMaster } = require('@socket.io/sticky');
    const { setupPrimary } = require('@socket.io/cluster-adapter');
    const httpServer = http.createServer();
    setupMaster(httpServer, { loadBalancingMethod: 'least-connection' });
    setupPrimary();
    forkAll(workers, 'online', () => httpServer.listen(port, '127.0.0.1', () => ready(port)));
  } else {
    const { setupWorker } = require('@socket.io/sticky');
    const { createAdapter } = require('@socket.io/cluster-adapter');
    const { io } = app();
    io.adapter(createAdapter());
    setupWorker(io);
  }
}

function floor(workers, port) {
  if (cluster.isPrimary) {
    cluster.schedulingPolicy = cluster.SCHED_NONE;
    forkAll(workers, 'listening', () => ready(port));
  } else {
    app().httpServer.listen(port, '127.0.0.1');
  }
}

/** Forks `n` workers; `then` runs once each has emitted `event`. */
function forkAll(n, event, then) {
  let pending = n;
  cluster.on(event, () => {
    pending -= 1;
    if (pending === 0) then();
  });
  cluster.on('exit', (w, code, signal) => {
    process.stderr.write(`worker ${w.process.pid} exited (${signal ?? code})\n`);
  });
  for (let i = 0; i < n; i += 1) cluster.fork();
}

const [mode, workers, port] = process.argv.slice(2);
process.on('SIGTERM', () => process.exit(0));
switch (mode) {
  case 'worker':
    worker();
    break;
  case 'sticky-master':
    stickyMaster(Number(workers), Number(port));
    break;
  case 'floor':
    floor(Number(workers), Number(port));
    break;
  default:
    process.stderr.write('usage: node server.js worker | sticky-master N PORT | floor N PORT\n');
    process.exit(2);
}
