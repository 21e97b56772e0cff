/**
 * The producer side of the cross-language test (clients/python/tests/
 * test_cross_language.py): publishes `--count` messages with the payload
 * `{"n": i}` over a pipelined publish stream, then republishes the first
 * `--republish` of them with the same ids, as a producer retrying after a
 * timeout would, and checks that the broker answers them as duplicates.
 *
 * Writes the message ids, one a line, to `--ids-file` and prints a JSON
 * summary on stdout. Exits non-zero on any failure.
 *
 *   node dist/test/support/producer.js --broker http://127.0.0.1:PORT \
 *     --topic T --count 10000 --ids-file ids.txt [--batch 100] [--republish 300] \
 *     [--ca ca.pem] [--token TOKEN]
 *
 * `--ca` is the CA bundle of an `https://` broker, `--token` a bearer token.
 * With `--trace`, an OpenTelemetry tracer provider is registered and
 * everything is published inside one span, whose ids the summary adds
 * (`trace_id`, `span_id`): the consumer checks that every message carries
 * it as its `traceparent`.
 */
import { readFileSync, writeFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { context, trace } from "@opentelemetry/api";
import { AsyncLocalStorageContextManager } from "@opentelemetry/context-async-hooks";
import { BasicTracerProvider } from "@opentelemetry/sdk-trace-base";
import { TidingsClient, message, type Message, type PublishResult } from "../../src/index.js";

const { values } = parseArgs({
  options: {
    broker: { type: "string" },
    topic: { type: "string" },
    count: { type: "string", default: "10000" },
    batch: { type: "string", default: "100" },
    republish: { type: "string", default: "300" },
    "ids-file": { type: "string" },
    ca: { type: "string" },
    token: { type: "string" },
    trace: { type: "boolean", default: false },
  },
});
if (!values.broker || !values.topic || !values["ids-file"]) {
  console.error(
    "usage: producer --broker URL --topic T --ids-file PATH [--count N] [--batch N] [--republish N] [--ca PEM] [--token T] [--trace]",
  );
  process.exit(2);
}
const count = Number(values.count);
const batchSize = Number(values.batch);
const republish = Math.min(Number(values.republish), count);
const topic = values.topic;
const idsFile = values["ids-file"];

if (values.trace) {
  trace.setGlobalTracerProvider(new BasicTracerProvider());
  context.setGlobalContextManager(new AsyncLocalStorageContextManager().enable());
}
const tracer = trace.getTracer("tidings-test-producer");

const client = new TidingsClient({
  baseUrl: values.broker,
  tls: values.ca ? { ca: readFileSync(values.ca) } : undefined,
  token: values.token,
});

/** Publishes everything; returns the summary. */
async function produce(): Promise<Record<string, unknown>> {
  const messages: Message[] = Array.from({ length: count }, (_, n) =>
    message(topic, JSON.stringify({ n }), { attributes: { producer: "typescript" } }),
  );
  writeFileSync(idsFile, messages.map((m) => m.id).join("\n") + "\n");

  const stream = client.publishStream(8);
  const answers: Array<Promise<PublishResult[]>> = [];
  for (let i = 0; i < count; i += batchSize) answers.push(stream.publish(messages.slice(i, i + batchSize)));
  await stream.close();
  const results = (await Promise.all(answers)).flat();
  const fresh = results.filter((r) => !r.duplicate).length;
  if (fresh !== count) throw new Error(`${count - fresh} of ${count} first publishes were duplicates`);

  // Retry the first messages with unary publishes: all duplicates, same sequences.
  const retried: PublishResult[] = [];
  for (let i = 0; i < republish; i += batchSize) {
    retried.push(...(await client.publish(messages.slice(i, Math.min(i + batchSize, republish)))));
  }
  retried.forEach((r, i) => {
    if (!r.duplicate || r.sequence !== results[i].sequence || r.id !== messages[i].id) {
      throw new Error(`republished message ${i} was not answered as a duplicate: ${JSON.stringify(r)}`);
    }
  });

  return {
    published: fresh,
    republished: retried.length,
    duplicates: retried.filter((r) => r.duplicate).length,
    first_sequence: Number(results[0]?.sequence ?? 0),
    last_sequence: Number(results[results.length - 1]?.sequence ?? 0),
  };
}

try {
  const summary = values.trace
    ? await tracer.startActiveSpan(`publish ${topic}`, async (span) => {
        try {
          const { traceId, spanId } = span.spanContext();
          return { ...(await produce()), trace_id: traceId, span_id: spanId };
        } finally {
          span.end();
        }
      })
    : await produce();
  console.log(JSON.stringify(summary));
} finally {
  client.close();
}
