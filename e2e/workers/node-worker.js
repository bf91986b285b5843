'use strict';

// The Node.js e2e worker (the contract all three languages implement):
// Socket.IO 4 at /socket.io/, any origin, `hello` on connection, `echo` and
// `whoami` with acks; sessions registered with sticky by @sticky/socket.io.
//
// Env: STICKY_WORKER, STICKY_CONTROL, LISTEN_FDS/LISTEN_PID (from sticky);
// PORT when run alone; NODE_WORKER_KEEPALIVE=1 turns the integration's
// `Connection: close` off (the keep-alive test's counterfactual only).

const http = require('node:http');
const { Server } = require('socket.io');
const { setupWorker } = require('../../integrations/node');

const worker = Number(process.env.STICKY_WORKER ?? 0);
const me = { worker, pid: process.pid, lang: 'node' };

const httpServer = http.createServer((req, res) => {
  res.writeHead(404, { 'Content-Type': 'text/plain' });
  res.end('not found\n');
});
const io = new Server(httpServer, {
  cors: { origin: '*', methods: ['GET', 'POST'] },
  maxHttpBufferSize: 4e6,
});

io.on('connection', (socket) => {
  socket.emit('hello', me);
  socket.on('echo', (payload, ack) => {
    if (typeof ack === 'function') ack(payload);
  });
  socket.on('whoami', (ack) => {
    if (typeof ack === 'function') ack(me);
  });
});

// NODE_WORKER_KEEPALIVE=1: never Connection: close; otherwise the
// integration's default (close, unless sticky resets foreign requests).
const sticky = setupWorker(io, {
  closeConnections: process.env.NODE_WORKER_KEEPALIVE === '1' ? false : undefined,
});
sticky.listen(Number(process.env.PORT ?? 3000), '127.0.0.1').then((address) => {
  if (!sticky.activated) console.log(`node worker listening on ${address.address}:${address.port}`);
});

process.on('SIGTERM', () => process.exit(0));
