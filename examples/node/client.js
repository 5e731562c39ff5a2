#!/usr/bin/env node
// A Mirador client in Node.js: @grpc/grpc-js + @grpc/proto-loader, loading the
// .proto files of ../../protos at run time (no generated code).
//
//   npm ci && node client.js [--model-host 127.0.0.1:50061] [--router 127.0.0.1:50051]
//                            [--route chat] [--text "Hello"] [--no-ask]
//                            [--tolerate-ask CODE,...] [--timeout-ms 10000]
//
// Calls ModelHost.ListModels, Router.Route with an explicit route, and Router.Ask
// (streamed), then prints one JSON object. Exits 1 on any RPC error, except an Ask
// that ends with a status listed in --tolerate-ask (default UNIMPLEMENTED: a
// capability not built yet), which is reported in the JSON and tolerated.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');

function parseArgs(argv) {
  const args = {
    modelHost: '127.0.0.1:50061',
    router: '127.0.0.1:50051',
    route: 'chat',
    text: 'Hello from Node.js',
    ask: true,
    tolerateAsk: ['UNIMPLEMENTED'],
    timeoutMs: 10000,
  };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      return argv[++i];
    };
    if (flag === '--model-host') args.modelHost = value();
    else if (flag === '--router') args.router = value();
    else if (flag === '--route') args.route = value();
    else if (flag === '--text') args.text = value();
    else if (flag === '--no-ask') args.ask = false;
    else if (flag === '--tolerate-ask') args.tolerateAsk = value().split(',').filter(Boolean);
    else if (flag === '--timeout-ms') args.timeoutMs = Number(value());
    else throw new Error(`unknown argument ${flag}`);
  }
  return args;
}

function loadMirador() {
  const definition = protoLoader.loadSync(
    ['mirador/v1/model_host.proto', 'mirador/v1/router.proto'],
    { includeDirs: [PROTO_ROOT], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
  );
  return grpc.loadPackageDefinition(definition).mirador.v1;
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) || String(code);
}

function rpcError(what, err) {
  const e = new Error(`${what}: ${statusName(err.code)}: ${err.details}`);
  e.status = statusName(err.code);
  e.details = err.details;
  return e;
}

function deadline(ms) {
  return new Date(Date.now() + ms);
}

function unary(client, method, request, timeoutMs) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: deadline(timeoutMs) }, (err, reply) => {
      if (err) reject(rpcError(method, err));
      else resolve(reply);
    });
  });
}

function ask(router, request, timeoutMs) {
  return new Promise((resolve) => {
    const events = [];
    const call = router.Ask(request, { deadline: deadline(timeoutMs) });
    call.on('data', (response) => events.push({ [response.event]: response[response.event] }));
    call.on('error', (err) => resolve({ status: statusName(err.code), details: err.details, events }));
    call.on('end', () => resolve({ status: 'OK', events }));
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const mirador = loadMirador();
  const credentials = grpc.credentials.createInsecure();
  const modelHost = new mirador.ModelHost(args.modelHost, credentials);
  const router = new mirador.Router(args.router, credentials);
  const result = {};
  try {
    result.list_models = await unary(modelHost, 'ListModels', {}, args.timeoutMs);
    result.route = await unary(router, 'Route', { text: args.text, route: args.route }, args.timeoutMs);
    if (args.ask) {
      result.ask = await ask(router, { text: args.text, route: args.route, sampling: { max_tokens: 16 } }, args.timeoutMs);
      if (result.ask.status !== 'OK' && !args.tolerateAsk.includes(result.ask.status)) {
        const e = new Error(`Ask: ${result.ask.status}: ${result.ask.details}`);
        e.status = result.ask.status;
        throw e;
      }
    }
  } finally {
    modelHost.close();
    router.close();
  }
  process.stdout.write(JSON.stringify(result, null, 2) + '\n');
}

main().catch((err) => {
  process.stderr.write(`mirador node client: ${err.message}\n`);
  process.exitCode = 1;
});
