'use strict';

// A Node.js worker of the broadcast tests: socket.io 4 with one of the
// official adapters, through @sticky/socket.io's setupWorker.
//
//   ADAPTER=cluster  @socket.io/cluster-adapter (needs sticky's IPC channel)
//   ADAPTER=redis    @socket.io/redis-adapter on REDIS_URL

const http = require('node:http');
const { Server } = require('socket.io');
const { setupWorker } = require('@sticky/socket.io');
const { attach } = require('./cluster-app');

async function adapter() {
  if (process.env.ADAPTER === 'redis') {
    const { createClient } = require('redis');
    const { createAdapter } = require('@socket.io/redis-adapter');
    const pub = createClient({ url: process.env.REDIS_URL });
    const sub = pub.duplicate();
    for (const c of [pub, sub]) c.on('error', (err) => console.error(`redis: ${err.message}`));
    await Promise.all([pub.connect(), sub.connect()]);
    return createAdapter(pub, sub);
  }
  return require('@socket.io/cluster-adapter').createAdapter();
}

async function main() {
  const httpServer = http.createServer();
  const io = new Server(httpServer, { cors: { origin: '*' }, maxHttpBufferSize: 4e6 });
  io.adapter(await adapter());
  attach(io);
  await setupWorker(io).listen(Number(process.env.PORT ?? 3000), '127.0.0.1');
}

process.on('SIGTERM', () => process.exit(0));
main().catch((err) => {
  console.error(`cluster worker: ${err.stack}`);
  process.exit(1);
});
