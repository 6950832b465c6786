// A cheap AMQP load generator for bench.scaleout: what h2load is for the gRPC half.
//
//   node bench/amqp/load.mjs URL QUEUE INFLIGHT WARMUP_S DURATION_S BODY_HEX
//
// Keeps INFLIGHT requests in flight on QUEUE (body: one serialized genserve.v1.GenerateRequest,
// the same for every request, as h2load's; content_type application/x-protobuf, reply_to an
// exclusive queue of its own, correlation_id unique), for WARMUP_S seconds and then DURATION_S
// measured ones, and prints one JSON line: the replies that came back in the measured window,
// the seconds it lasted, and replies to nothing in flight (duplicates). It reads no reply's body:
// the statuses are counted from the servers' /metrics (bench/accounting.py), as for gRPC. The
// Python AsyncAmqpClient costs the load about as much CPU per request as the server spends on
// it (stop 19: 0.8 vs 0.89 ms), so on shared cores it measured the client; this costs far less.
// Needs amqplib: scripts/bench_setup.sh runs `npm ci --prefix bench/amqp` (bench/amqp/package.json).

import amqp from "amqplib";

const [url, queue, inflightArg, warmupArg, durationArg, bodyHex] = process.argv.slice(2);
if (!bodyHex) {
  console.error("usage: node bench/amqp/load.mjs URL QUEUE INFLIGHT WARMUP_S DURATION_S BODY_HEX");
  process.exit(2);
}
const inflight = Number(inflightArg);
const warmupMs = Number(warmupArg) * 1000;
const durationMs = Number(durationArg) * 1000;
const body = Buffer.from(bodyHex, "hex");

const connection = await amqp.connect(url);
const channel = await connection.createChannel();
const { queue: replyTo } = await channel.assertQueue("", { exclusive: true, autoDelete: true });

const open = new Set();
let next = 0;
let measuring = false;
let stopping = false;
let done = 0;
let duplicates = 0;

function send() {
  const id = `r${next++}`;
  open.add(id);
  channel.sendToQueue(queue, body, { replyTo, correlationId: id, contentType: "application/x-protobuf" });
}

await channel.consume(
  replyTo,
  (msg) => {
    if (msg === null) return;
    const id = msg.properties.correlationId;
    if (!open.delete(id)) {
      duplicates += 1;
      return;
    }
    if (measuring) done += 1;
    if (!stopping) send();
  },
  { noAck: true },
);

for (let i = 0; i < inflight; i++) send();
await new Promise((resolve) => setTimeout(resolve, warmupMs));
measuring = true;
const start = process.hrtime.bigint();
await new Promise((resolve) => setTimeout(resolve, durationMs));
measuring = false;
stopping = true;
const elapsed = Number(process.hrtime.bigint() - start) / 1e9;
console.log(JSON.stringify({ done, elapsed, duplicates, open: open.size }));
await channel.close();
await connection.close();
