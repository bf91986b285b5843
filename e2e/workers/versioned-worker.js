'use strict';

// A Socket.IO worker that says which version of the code it started with:
// it reads $VERSION_FILE once, at start, as a deploy would read its code.
// The reload tests rewrite the file, then run `sticky reload`. A version
// starting with "broken" throws at start, like a bad build.
//
// With VERSIONED_REGISTER=1 it registers its sessions through the Node.js
// integration (integrations/node); otherwise it has no sticky code at all
// (sticky learns its sessions). Events: `hello` on connection, `echo` and
// `whoami` with acks.

const fs = require('node:fs');
const http = require('node:http');
const { Server } = require('socket.io');

const version = fs.readFileSync(process.env.VERSION_FILE, 'utf8').trim();
if (version.startsWith('broken')) throw new Error(`version ${version} cannot start`);

const me = {
  worker: Number(process.env.STICKY_WORKER ?? 0),
  generation: Number(process.env.STICKY_GENERATION ?? 0),
  pid: process.pid,
  version,
};
const httpServer = http.createServer();
const io = new Server(httpServer, { cors: { origin: '*', methods: ['GET', 'POST'] } });
io.on('connection', (socket) => {
  socket.emit('hello', me);
  socket.on('echo', (payload, ack) => ack(payload));
  socket.on('whoami', (ack) => ack(me));
});

if (process.env.VERSIONED_REGISTER === '1') {
  const { setupWorker } = require('../../integrations/node');
  setupWorker(io).listen();
} else {
  httpServer.listen({ fd: 3 });
}
process.on('SIGTERM', () => process.exit(0));
