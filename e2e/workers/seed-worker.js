'use strict';

// The worker half of @socket.io/sticky's README example (1.0.4), as a user
// migrating to sticky keeps it: the master half deleted, one require
// changed ("@socket.io/sticky" -> "@sticky/socket.io"). Only the body of the
// connection handler is the tests' (cluster-app.js), and the README's
// `cluster.isMaster` branch is gone with the master.

const http = require("http");
const { Server } = require("socket.io");
const { setupWorker } = require("@sticky/socket.io");
const { createAdapter } = require("@socket.io/cluster-adapter");

console.log(`Worker ${process.pid} started`);

const httpServer = http.createServer();
const io = new Server(httpServer);

// use the cluster adapter
io.adapter(createAdapter());

// setup connection with the primary process
setupWorker(io);

require("./cluster-app").attach(io);
