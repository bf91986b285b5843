'use strict';

// The browser test app, Node.js: an ordinary Socket.IO app whose worker
// serves its own page, script, stylesheet and JSON API (node:http's
// keep-alive default), e2e/test/browser.test.js. `hello` {worker, pid} on
// connection; `echo` acks {pid, payload}.
//
// APP_STICKY=integration uses integrations/node as its README says;
// otherwise (plain) the app has no sticky code and only listens on fd 3.
// APP_REDIS_URL: the official Redis adapter (@socket.io/redis-adapter) on
// that redis-server, so `shout` reaches every tab on every host; APP_HOST
// names the host in `hello` and in each shout.

const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const { Server } = require('socket.io');

const PAGE_DIR = process.env.APP_PAGE_DIR || path.join(__dirname, '..', 'browser-app');
const CLIENT_JS = process.env.APP_CLIENT_JS || require.resolve('socket.io-client/dist/socket.io.min.js');
const me = {
  worker: Number(process.env.STICKY_WORKER ?? 0),
  pid: process.pid,
  lang: 'node',
  host: process.env.APP_HOST ?? null,
};
const files = {
  '/': ['text/html; charset=utf-8', fs.readFileSync(path.join(PAGE_DIR, 'index.html'))],
  '/app.js': ['text/javascript', fs.readFileSync(path.join(PAGE_DIR, 'app.js'))],
  '/app.css': ['text/css', fs.readFileSync(path.join(PAGE_DIR, 'app.css'))],
  '/client.js': ['text/javascript', fs.readFileSync(CLIENT_JS)],
};

const httpServer = http.createServer((req, res) => {
  const { pathname } = new URL(req.url, 'http://app');
  if (pathname === '/api/ping') {
    res.writeHead(200, { 'Content-Type': 'application/json', 'Cache-Control': 'no-store' });
    // What a front proxy says the client's address is (X-Forwarded-For).
    const forwardedFor = req.headers['x-forwarded-for'] ?? null;
    return res.end(JSON.stringify({ ...me, forwardedFor, at: Date.now() }));
  }
  const file = files[pathname];
  if (!file) {
    res.writeHead(404, { 'Content-Type': 'text/plain' });
    return res.end('not found\n');
  }
  res.writeHead(200, { 'Content-Type': file[0], 'Cache-Control': 'no-store' });
  res.end(file[1]);
});
const io = new Server(httpServer);
io.on('connection', (socket) => {
  socket.emit('hello', me);
  socket.on('echo', (payload, ack) => ack({ pid: me.pid, payload }));
  socket.on('shout', (payload) => io.emit('shout', { ...payload, host: me.host, pid: me.pid }));
});

async function useRedis(url) {
  const { createClient } = require('redis');
  const { createAdapter } = require('@socket.io/redis-adapter');
  const pub = createClient({ url });
  const sub = pub.duplicate();
  for (const client of [pub, sub]) client.on('error', (err) => console.error(`redis: ${err.message}`));
  await Promise.all([pub.connect(), sub.connect()]);
  io.adapter(createAdapter(pub, sub));
}

async function main() {
  // The adapter first: a session must not join rooms of the default one.
  if (process.env.APP_REDIS_URL) await useRedis(process.env.APP_REDIS_URL);
  if (process.env.APP_STICKY === 'integration') {
    const { setupWorker } = require('../../integrations/node');
    await setupWorker(io).listen(Number(process.env.PORT ?? 3000));
  } else {
    const activated = process.env.LISTEN_FDS === '1' && Number(process.env.LISTEN_PID) === process.pid;
    httpServer.listen(activated ? { fd: 3 } : { port: Number(process.env.PORT ?? 3000), host: '127.0.0.1' });
  }
}
main().catch((err) => {
  console.error(`browser app: ${err.message}`);
  process.exit(1);
});
process.on('SIGTERM', () => process.exit(0));
