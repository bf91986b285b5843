'use strict';

// The application of the broadcast tests (test/cluster.test.js), the same
// in every Node.js worker variant: what a client can ask of the cluster.
//
//   hello (server -> client, on connection): { worker, pid }
//   join(room, ack)                 socket.join(room)
//   shout(payload, ack)             io.emit('shout', payload)
//   shout-room(room, payload, ack)  io.to(room).emit('shout-room', payload)
//   count(ack)                      ack((await io.fetchSockets()).length)
//   ask-others(ack)                 io.serverSideEmit('who', ...) with an ack:
//                                   ack({ error, answers: [{worker, pid}] })
//   who (server-side event)         answers { worker, pid }

function attach(io) {
  const me = { worker: Number(process.env.STICKY_WORKER ?? 0), pid: process.pid };
  io.on('who', (answer) => answer(me));
  io.on('connection', (socket) => {
    socket.emit('hello', me);
    socket.on('join', (room, ack) => {
      socket.join(room);
      ack(me);
    });
    socket.on('shout', (payload, ack) => {
      io.emit('shout', payload);
      ack(me);
    });
    socket.on('shout-room', (room, payload, ack) => {
      io.to(room).emit('shout-room', payload);
      ack(me);
    });
    socket.on('count', async (ack) => {
      try {
        ack({ count: (await io.fetchSockets()).length });
      } catch (err) {
        ack({ error: err.message });
      }
    });
    socket.on('ask-others', (ack) => {
      io.serverSideEmit('who', (err, answers) => {
        ack({ error: err ? err.message : null, answers: answers ?? [] });
      });
    });
  });
  return me;
}

module.exports = { attach };
