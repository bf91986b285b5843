'use strict';

// The Socket.IO app of the broadcast benchmark (run.js), and how it runs:
//
//   node server.js worker            under `sticky run`: fd 3; ADAPTER=cluster
//                                    (sticky's IPC relay), ADAPTER=relay
//                                    (createRelayAdapter: the relay socket),
//                                    ADAPTER=redis, or ADAPTER=none (Socket.IO's
//                                    in-memory adapter: nothing crosses workers)
//   node server.js seed N PORT       @socket.io/sticky 1.0.4 on Node's cluster,
//                                    setupPrimary() of @socket.io/cluster-adapter
//                                    in the primary, as in their READMEs
//
// Prints `ready PORT` once serving (the seed: once every worker is up).
//
// The app: on connection, `hello` { worker }; `blast` { count, size } from
// a client makes its worker io.emit('tick', { seq, t, pad }) `count` times,
// `t` the wall-clock time of the emit in ms (performance.timeOrigin +
// performance.now(): sub-millisecond, comparable across processes).

const cluster = require('node:cluster');
const http = require('node:http');
const { Server } = require('socket.io');

const now = () => performance.timeOrigin + performance.now();

function app(adapter) {
  const httpServer = http.createServer();
  const io = new Server(httpServer, { cors: { origin: '*' } });
  if (adapter) io.adapter(adapter);
  const worker = Number(process.env.STICKY_WORKER ?? (cluster.worker ? cluster.worker.id - 1 : 0));
  io.on('connection', (socket) => {
    socket.emit('hello', { worker, pid: process.pid });
    socket.on('blast', ({ count, size }, ack) => {
      const pad = 'x'.repeat(size);
      let seq = 0;
      // Batches of 20, yielding between them so the event loop also writes.
      const batch = () => {
        for (let i = 0; i < 20 && seq < count; i++) io.emit('tick', { seq: seq++, t: now(), pad });
        if (seq < count) setImmediate(batch);
        else ack({ worker });
      };
      batch();
    });
  });
  return { httpServer, io };
}

async function adapterFromEnv() {
  if (process.env.ADAPTER === 'none') return null;
  if (process.env.ADAPTER === 'redis') {
    const { createClient } = require('redis');
    const { createAdapter } = require('@socket.io/redis-adapter');
    const pub = createClient({ url: process.env.REDIS_URL });
    const sub = pub.duplicate();
    await Promise.all([pub.connect(), sub.connect()]);
    return createAdapter(pub, sub);
  }
  if (process.env.ADAPTER === 'relay') return require('@sticky/socket.io').createRelayAdapter();
  return require('@socket.io/cluster-adapter').createAdapter();
}

async function stickyWorker() {
  const { httpServer } = app(await adapterFromEnv());
  httpServer.listen({ fd: 3 }, () => process.stdout.write(`ready ${httpServer.address().port}\n`));
}

function seed(workers, port) {
  if (cluster.isPrimary) {
    const { setupMaster } = require('@socket.io/sticky');
    const { setupPrimary } = require('@socket.io/cluster-adapter');
    const httpServer = http.createServer();
    setupMaster(httpServer, { loadBalancingMethod: 'least-connection' });
    setupPrimary();
    cluster.setupPrimary({ serialization: 'advanced' });
    let online = 0;
    cluster.on('online', () => {
      online += 1;
      if (online === workers) httpServer.listen(port, '127.0.0.1', () => process.stdout.write(`ready ${port}\n`));
    });
    for (let i = 0; i < workers; i++) cluster.fork();
  } else {
    const { setupWorker } = require('@socket.io/sticky');
    const { createAdapter } = require('@socket.io/cluster-adapter');
    const { io } = app(createAdapter());
    setupWorker(io);
  }
}

process.on('SIGTERM', () => process.exit(0));
const [mode, workers, port] = process.argv.slice(2);
if (mode === 'worker') stickyWorker();
else if (mode === 'seed') seed(Number(workers), Number(port));
else {
  process.stderr.write('usage: node server.js worker | seed N PORT\n');
  process.exit(2);
}
