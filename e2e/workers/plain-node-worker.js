'use strict';

// A Socket.IO worker with no sticky code at all: it only listens on the
// socket sticky hands over (fd 3). No registration, no Connection: close.
// With `sticky run --learn on` (the default) sticky learns its sessions
// from the handshake answers; test/learning.test.js. Same events as
// node-worker.js.

const http = require('node:http');
const { Server } = require('socket.io');

const me = { worker: Number(process.env.STICKY_WORKER ?? 0), pid: process.pid, lang: 'node' };
const httpServer = http.createServer();
const io = new Server(httpServer, { cors: { origin: '*', methods: ['GET', 'POST'] }, maxHttpBufferSize: 4e6 });
io.on('connection', (socket) => {
  socket.emit('hello', me);
  socket.on('echo', (payload, ack) => ack(payload));
  socket.on('whoami', (ack) => ack(me));
});
const activated = process.env.LISTEN_FDS === '1' && Number(process.env.LISTEN_PID) === process.pid;
httpServer.listen(activated ? { fd: 3 } : { port: Number(process.env.PORT ?? 3000), host: '127.0.0.1' });
process.on('SIGTERM', () => process.exit(0));
