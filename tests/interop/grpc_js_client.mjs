// A client that is not ours: grpc-js (the Node.js gRPC library) against genserve, used by
// tests/test_interop.py. It loads proto/ at run time (no generated code), runs one scenario and
// prints one JSON line of what it saw: statuses, details, trailing metadata, payload digests.
//
//   node grpc_js_client.mjs ADDRESS SCENARIO     (SCENARIO: calls | refused)
import { createHash } from "node:crypto";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import grpc from "@grpc/grpc-js";
import loader from "@grpc/proto-loader";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..", "proto");
const definition = loader.loadSync("genserve/v1/generator.proto", { includeDirs: [root], defaults: true, longs: Number, enums: String });
const Generator = grpc.loadPackageDefinition(definition).genserve.v1.Generator;
const [address, scenario] = process.argv.slice(2);
const client = new Generator(address, grpc.credentials.createInsecure());
const deadline = () => new Date(Date.now() + 20000);

function failure(e) {
  return { code: e.code, details: e.details, metadata: e.metadata ? e.metadata.getMap() : {} };
}

// One Generate call: every message, then its status.
function generate(request) {
  return new Promise((resolve) => {
    const messages = [];
    const call = client.Generate(request, { deadline: deadline() });
    call.on("data", (m) => messages.push(m));
    call.on("error", (e) => resolve({ messages, ...failure(e) }));
    call.on("end", () => resolve({ messages, code: 0 }));
  });
}

function summary(result) {
  const pixels = createHash("sha256");
  let images = 0;
  let text = "";
  let finish = null;
  for (const m of result.messages) {
    if (m.images) {
      images += m.images.count;
      pixels.update(m.images.pixels);
    }
    if (m.text) text += m.text.text;
    if (m.finish) finish = { reason: m.finish.reason, seed: m.finish.seed, model: m.finish.model, nGenerated: m.finish.nGenerated };
  }
  return { code: result.code, details: result.details, metadata: result.metadata, images, pixels: pixels.digest("hex"), text, finish };
}

// GenerateStream: wait for the credit grant, send the requests in one message, collect their Finishes.
function stream(requests) {
  return new Promise((resolve) => {
    const call = client.GenerateStream({ deadline: deadline() });
    const finishes = {};
    let credits = 0;
    let sent = false;
    call.on("data", (m) => {
      credits += m.credits;
      if (!sent && credits >= requests.length) {
        sent = true;
        call.write({ requests });
      }
      for (const r of m.results) if (r.finish) finishes[r.id] = { reason: r.finish.reason, code: r.finish.code };
      if (Object.keys(finishes).length === requests.length) call.end();
    });
    call.on("error", (e) => resolve({ credits, finishes, ...failure(e) }));
    call.on("end", () => resolve({ credits, finishes, code: 0 }));
  });
}

async function calls() {
  const models = await new Promise((resolve) =>
    client.ListModels({}, { deadline: deadline() }, (e, r) => resolve(e ? failure(e) : r.models.map((m) => m.name))),
  );
  return {
    models,
    image: summary(await generate({ model: "vae", image: { n: 3, seed: 7 } })),
    text: summary(await generate({ model: "transformer", text: { prompt: "ROMEO:", maxNewTokens: 20, seed: 1, temperature: 0 } })),
    unknown: summary(await generate({ model: "no-such-model", image: { n: 1 } })),
    invalid: summary(await generate({ model: "vae", image: { n: 100000 } })),
    stream: await stream([
      { id: "a", model: "vae", image: { n: 1, seed: 1 } },
      { id: "b", model: "gan", image: { n: 2, seed: 2 } },
    ]),
  };
}

// With a front of one slot and no queue: a text call holds the slot, the next Generate is refused.
async function refused() {
  const holder = client.Generate({ model: "transformer", text: { prompt: "ROMEO:", maxNewTokens: 1024, seed: 1 } });
  holder.on("error", () => {});
  await new Promise((resolve) => holder.once("data", resolve));
  const result = summary(await generate({ model: "vae", image: { n: 1, seed: 3 } }));
  holder.cancel();
  return { refused: result };
}

const out = scenario === "refused" ? await refused() : await calls();
client.close();
console.log(JSON.stringify(out));
