#!/usr/bin/env node
// Mirador through the official `openai` npm package: the gateway speaks OpenAI's HTTP API, so a
// JavaScript application only changes its baseURL.
//
//   npm ci && node openai_client.js [--base-url http://127.0.0.1:8080/v1] [--model chat]
//                                   [--embedding-model auto] [--text "Hello"]
//
// Lists the models, asks one chat completion whole and one streamed, embeds one text, and prints
// one JSON object with what came back. Exits 1 on any error (its status and message printed).
'use strict';

const OpenAI = require('openai');

function parseArgs(argv) {
  const args = { baseURL: 'http://127.0.0.1:8080/v1', model: 'chat', embeddingModel: 'auto', text: 'Hello from Node.js' };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === '--base-url') args.baseURL = value;
    else if (flag === '--model') args.model = value;
    else if (flag === '--embedding-model') args.embeddingModel = value;
    else if (flag === '--text') args.text = value;
    else throw new Error(`unknown option ${flag}`);
  }
  return args;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  // The key is the router's bearer token when the mesh has one; any string otherwise.
  const client = new OpenAI({ baseURL: args.baseURL, apiKey: process.env.MIRADOR_TOKEN || 'none', maxRetries: 0 });
  const messages = [{ role: 'user', content: args.text }];

  const models = [];
  for await (const model of client.models.list()) models.push(model.id);

  const whole = await client.chat.completions.create({ model: args.model, messages, max_tokens: 8 });

  let streamed = '';
  let chunks = 0;
  const stream = await client.chat.completions.create({ model: args.model, messages, max_tokens: 8, stream: true });
  for await (const chunk of stream) {
    chunks += 1;
    streamed += chunk.choices[0]?.delta?.content || '';
  }

  const embedded = await client.embeddings.create({ model: args.embeddingModel, input: args.text });

  console.log(JSON.stringify({
    models,
    answer: { model: whole.model, text: whole.choices[0].message.content, finish_reason: whole.choices[0].finish_reason,
              usage: whole.usage, route: whole.mirador ? whole.mirador.route : null },
    streamed: { text: streamed, chunks },
    embedding: { model: embedded.model, dimension: embedded.data[0].embedding.length },
  }));
}

main().catch((error) => {
  console.error(`${error.status || ''} ${error.message}`.trim());
  process.exit(1);
});
