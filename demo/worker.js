'use strict';

// The sticky demo worker (`cargo xtask run`):
//
//   sticky run --listen 127.0.0.1:3000 --workers 3 -- node demo/worker.js
//
// - GET / in a browser: a page whose Socket.IO session shows which worker
//   holds it, its transport, an echo button, and a chat across workers: a
//   message typed in one tab appears in every tab, whatever worker holds
//   it (@socket.io/cluster-adapter, relayed by sticky over Node IPC).
//   Open several tabs.
// - GET / with curl: `worker=N pid=P`.
// - GET /register?sid=X, /unregister?sid=X: report a session to sticky, so
//   `curl '.../?sid=X'` always reaches this worker.
//
// Runs without sticky too (PORT, default 3000).

const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');
const { Server } = require('socket.io');
const { setupWorker } = require('@sticky/socket.io');

const worker = Number(process.env.STICKY_WORKER ?? 0);
const me = { worker, pid: process.pid, lang: 'node' };
const page = fs.readFileSync(path.join(__dirname, 'index.html'));

const httpServer = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://localhost');
  const text = (status, body) => {
    res.writeHead(status, {
      'Content-Type': 'text/plain; charset=utf-8',
      'X-Sticky-Worker': String(worker),
      'X-Sticky-Pid': String(process.pid),
    });
    res.end(body);
  };
  if (req.method !== 'GET') return text(405, 'method not allowed\n');
  if (url.pathname === '/' && /text\/html/.test(req.headers.accept || '')) {
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' });
    return res.end(page);
  }
  if (url.pathname === '/register' || url.pathname === '/unregister') {
    const sid = url.searchParams.get('sid');
    if (!sid) return text(400, 'missing sid\n');
    if (!sticky.control) return text(500, 'not running under sticky (no STICKY_CONTROL)\n');
    const register = url.pathname === '/register';
    try {
      await (register ? sticky.control.open(sid) : sticky.control.close(sid));
      return text(200, `worker=${worker} ${register ? 'registered' : 'unregistered'}=${sid}\n`);
    } catch (err) {
      return text(500, `err ${err.message}\n`);
    }
  }
  return text(200, `worker=${worker} pid=${process.pid}\n`);
});

const io = new Server(httpServer, {
  cors: { origin: '*', methods: ['GET', 'POST'] },
  maxHttpBufferSize: 4e6,
});
// Broadcasts reach every worker's clients under sticky (which gives a
// `node` worker its IPC channel); alone, process.send is missing and the
// default in-process adapter is enough.
if (process.send) io.adapter(require('@socket.io/cluster-adapter').createAdapter());

/** Tells every tab how many sessions the cluster holds, over how many workers. */
async function announceOnline() {
  try {
    const sockets = await io.fetchSockets();
    const workers = new Set(sockets.map((s) => s.data.worker)).size;
    io.emit('online', { sessions: sockets.length, workers });
  } catch (err) {
    console.error(`demo worker ${worker}: fetchSockets: ${err.message}`);
  }
}

// Also every 2 s: a worker's adapter learns of the others by their
// heartbeats, so a count taken just after a start can miss a worker, and
// connections alone would leave a tab showing it until the next one.
setInterval(announceOnline, 2000).unref();

// Why Engine.IO refused a request (e.g. `Session ID unknown`): the log says
// which request and on which connection, the first thing to look at.
io.engine.on('connection_error', (err) => {
  const { req } = err;
  console.error(`demo worker ${worker}: ${req.method} ${req.url} from port ${req.socket.remotePort}: ` +
    `${err.message} (${err.code}${err.context ? ' ' + JSON.stringify(err.context) : ''})`);
});

io.on('connection', (socket) => {
  socket.data.worker = worker;
  socket.emit('hello', me);
  announceOnline();
  socket.on('disconnect', () => setTimeout(announceOnline, 50));
  socket.on('chat', (text, ack) => {
    if (typeof text !== 'string' || text.length === 0 || text.length > 500) return;
    io.emit('chat', { text, worker, from: socket.id.slice(0, 6), at: Date.now() });
    if (typeof ack === 'function') ack(me);
  });
  socket.on('echo', (payload, ack) => {
    if (typeof ack === 'function') ack(payload);
  });
  socket.on('whoami', (ack) => {
    if (typeof ack === 'function') ack(me);
  });
});

const sticky = setupWorker(io);
sticky.listen(Number(process.env.PORT ?? 3000), '127.0.0.1').then((address) => {
  const where = sticky.activated ? 'the socket sticky handed over' : `${address.address}:${address.port}`;
  console.log(`demo worker ${worker} (pid ${process.pid}) serving on ${where}`);
});

process.on('SIGTERM', () => process.exit(0));
