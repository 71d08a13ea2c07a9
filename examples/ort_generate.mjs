// Greedy generation from a kvcompile artifact's ONNX graphs in Node.js with onnxruntime-node.
//
//   node examples/ort_generate.mjs ARTIFACT --ids 5,9,11 --ids 40,41 --max-new-tokens 32
//
// Written from docs/ONNX.md alone, as a team serving the artifact from another language would.
// Each --ids is one prompt, already tokenized (token ids, comma-separated: tokenize with the
// artifact's tokenizer.json, see docs/ONNX.md "Tokens in, tokens out"); the prompts are
// served together as rows of one batched cache: each prefilled alone (B=1) into its row, then
// all rows decoded in one step per token with their own past_length. Prints one JSON line:
// the generated ids of each prompt, stopped at an EOS id of generation_config.json or at
// --max-new-tokens.
//
// The cache is allocated once and updated in place: every cache tensor is passed as the
// `past.*` input and, the same Tensor object, as the pre-allocated `present.*` fetch.
// Install onnxruntime-node with `make node-example` (into examples/node/) or anywhere on the
// module path. No checksums are checked here (`kvcompile run` does).
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import process from 'node:process';

function loadOrt() {
  // examples/node/node_modules (make node-example) first, then the caller's own install
  const bases = [new URL('./node/package.json', import.meta.url), join(process.cwd(), 'x.js')];
  for (const base of bases) {
    try {
      return createRequire(base)('onnxruntime-node');
    } catch (error) {
      if (error.code !== 'MODULE_NOT_FOUND') throw error;
    }
  }
  throw new Error('onnxruntime-node is not installed: run `make node-example`');
}

function parseArgs(argv) {
  const args = { artifact: null, prompts: [], maxNewTokens: 32 };
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === '--ids') args.prompts.push(argv[++i].split(',').map((t) => BigInt(t)));
    else if (argv[i] === '--max-new-tokens') args.maxNewTokens = Number(argv[++i]);
    else args.artifact = argv[i];
  }
  if (!args.artifact || args.prompts.length === 0) {
    throw new Error('usage: ort_generate.mjs ARTIFACT --ids 1,2,3 [--ids ...] [--max-new-tokens N]');
  }
  return args;
}

function stopIds(artifact) {
  // the EOS id(s) kvcompile stops at: eos_token_id of generation_config.json (a number or a list)
  const config = JSON.parse(readFileSync(join(artifact, 'generation_config.json'), 'utf8'));
  const eos = config.eos_token_id;
  return new Set(eos == null ? [] : [].concat(eos).map(Number));
}

function argmax(values, offset, size) {
  let best = 0;
  for (let j = 1; j < size; j += 1) if (values[offset + j] > values[offset + best]) best = j;
  return best; // the first maximum, as numpy and torch pick it
}

async function main() {
  const ort = loadOrt();
  const { artifact, prompts, maxNewTokens } = parseArgs(process.argv.slice(2));
  const eos = stopIds(artifact);
  const options = { executionProviders: ['cpu'], logSeverityLevel: 3 };
  const prefill = await ort.InferenceSession.create(join(artifact, 'onnx', 'prefill.onnx'), options);
  const decode = await ort.InferenceSession.create(join(artifact, 'onnx', 'decode.onnx'), options);

  // The cache: decode's inputs after input_ids and past_length, static except the batch.
  const rows = prompts.length;
  const cache = decode.inputMetadata.slice(2).map((meta) => {
    const rowShape = meta.shape.slice(1);
    const perRow = rowShape.reduce((a, b) => a * b, 1);
    const Data = meta.type === 'int64' ? BigInt64Array : Float32Array;
    const data = new Data(rows * perRow);
    return {
      past: meta.name,
      present: meta.name.replace(/^past\./, 'present.'),
      all: new ort.Tensor(meta.type, data, [rows, ...rowShape]),
      // row r: a view of the same memory, what prefill writes into
      row: (r) => new ort.Tensor(meta.type, data.subarray(r * perRow, (r + 1) * perRow), [1, ...rowShape]),
    };
  });
  const vocab = decode.outputMetadata.find((meta) => meta.name === 'logits').shape[1];
  const logits = new Float32Array(rows * vocab);
  const pastLength = new BigInt64Array(rows);
  const inputIds = new BigInt64Array(rows);

  const generated = prompts.map(() => []);
  const running = prompts.map(() => true);
  const pick = (r) => {
    const token = argmax(logits, r * vocab, vocab);
    if (eos.has(token)) running[r] = false;
    else {
      generated[r].push(token);
      running[r] = generated[r].length < maxNewTokens;
      inputIds[r] = BigInt(token);
    }
  };

  for (let r = 0; r < rows; r += 1) { // each prompt alone into its row
    const fetches = { logits: new ort.Tensor('float32', logits.subarray(r * vocab, (r + 1) * vocab), [1, vocab]) };
    for (const tensor of cache) fetches[tensor.present] = tensor.row(r);
    await prefill.run({ input_ids: new ort.Tensor('int64', prompts[r], [1, prompts[r].length]) }, fetches);
    pastLength[r] = BigInt(prompts[r].length);
    pick(r);
  }
  const feeds = {
    input_ids: new ort.Tensor('int64', inputIds, [rows, 1]),
    past_length: new ort.Tensor('int64', pastLength, [rows]),
  };
  const fetches = { logits: new ort.Tensor('float32', logits, [rows, vocab]) };
  for (const tensor of cache) {
    feeds[tensor.past] = tensor.all; // the same tensor in and out: updated in place
    fetches[tensor.present] = tensor.all;
  }
  while (running.some(Boolean)) { // all rows in one step; a finished row is fed and ignored
    await decode.run(feeds, fetches);
    for (let r = 0; r < rows; r += 1) {
      if (!running[r]) continue;
      pastLength[r] += 1n;
      pick(r);
    }
  }
  console.log(JSON.stringify(generated));
}

await main();
