// Streams an answer from a running `rag serve` over gRPC (rag.v1), printing text as it arrives.
//
//   node answer.js HOST:PORT COLLECTION "question" [token]
//
// Prints the deltas to stdout, then a final JSON line {"done": ...} with the finish
// reason, token usage and source list. Exits 1 with the gRPC status on error.
"use strict";
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, collection, question, token] = process.argv.slice(2);
if (!address || !collection || !question) {
  console.error("usage: node answer.js HOST:PORT COLLECTION QUESTION [TOKEN]");
  process.exit(2);
}
const def = protoLoader.loadSync(path.join(__dirname, "../../proto/rag/v1/rag.proto"), {
  keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
  includeDirs: [path.join(__dirname, "../../proto")],
});
const rag = grpc.loadPackageDefinition(def).rag.v1;
const client = new rag.AnswerService(address, grpc.credentials.createInsecure());
const md = new grpc.Metadata();
if (token) md.add("authorization", `Bearer ${token}`);

let sources = [];
const call = client.Answer({ collection, question, options: { max_new_tokens: 48 } }, md);
call.on("data", (msg) => {
  if (msg.event === "sources") sources = msg.sources.sources.map((s) => ({ number: s.number, source: s.hit.source }));
  else if (msg.event === "delta") process.stdout.write(msg.delta.text);
  else if (msg.event === "done") {
    const d = msg.done;
    process.stdout.write("\n" + JSON.stringify({ done: { finish_reason: d.finish_reason, usage: d.usage, text: d.text, sources } }) + "\n");
  }
});
call.on("error", (err) => { console.error(`error: ${err.code} ${err.details}`); process.exit(1); });
call.on("end", () => client.close());
