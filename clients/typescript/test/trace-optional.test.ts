/**
 * Trace context when tracing is not set up: `@opentelemetry/api` without a
 * registered tracer provider (this process registers none), and no
 * `@opentelemetry/api` at all (a child process that cannot resolve it).
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { trace } from "@opentelemetry/api";
import Database from "better-sqlite3";
import { Inbox, InboxResult, message, messageContext } from "../src/index.js";
import { TEST_TIMEOUT, withBroker } from "./support/harness.js";

const UNTRACED = join(dirname(fileURLToPath(import.meta.url)), "support", "untraced.js");

/** Resolution hooks that hide `@opentelemetry/api` from `import`. */
const HIDE_FROM_IMPORT = `
export async function resolve(specifier, context, next) {
  if (specifier === "@opentelemetry/api" || specifier.startsWith("@opentelemetry/api/")) {
    const error = new Error("Cannot find package '" + specifier + "'");
    error.code = "ERR_MODULE_NOT_FOUND";
    throw error;
  }
  return next(specifier, context);
}
`;

/**
 * Makes `@opentelemetry/api` unresolvable, by `require` and by `import`, in
 * the process it is preloaded in: as if it were not installed.
 */
const HIDE_OPENTELEMETRY = `
const Module = require("node:module");
Module.register("data:text/javascript," + encodeURIComponent(${JSON.stringify(HIDE_FROM_IMPORT)}));
const resolve = Module._resolveFilename;
Module._resolveFilename = function (request, ...rest) {
  if (request === "@opentelemetry/api" || request.startsWith("@opentelemetry/api/")) {
    const error = new Error("Cannot find module '" + request + "'");
    error.code = "MODULE_NOT_FOUND";
    throw error;
  }
  return resolve.call(this, request, ...rest);
};
`;

test("without a tracer provider nothing is injected, and a traceparent is still read", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (client) => {
    await client.createTopic("orders");
    await client.createSubscription("billing", "orders", { start: "earliest" });
    const upstream = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    const sent = [message("orders", "in a span"), message("orders", "explicit", { attributes: { traceparent: upstream } })];
    // The API's no-op tracer: its spans are never valid.
    await trace.getTracer("tidings-tests").startActiveSpan("place order", async (span) => {
      await client.publish(sent);
      span.end();
    });

    const stream = client.subscribe("billing");
    const db = new Database(":memory:");
    const inbox = new Inbox(db, "billing");
    inbox.createTable();
    for (const m of sent) {
      const delivery = await stream.receive(10_000);
      assert.ok(delivery);
      assert.equal(delivery.id, m.id);
      assert.deepEqual(delivery.message.attributes, m.attributes);
      const parent = trace.getSpanContext(messageContext(delivery));
      assert.deepEqual(
        parent && [parent.traceId, parent.spanId],
        m.attributes.traceparent ? ["0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"] : undefined,
      );
      assert.equal(await inbox.handle(delivery, () => undefined), InboxResult.Processed);
    }
    await stream.close();
    db.close();
  }),
);

test("without @opentelemetry/api the client publishes and handles untraced", { timeout: TEST_TIMEOUT }, () =>
  withBroker(async (_client, broker) => {
    const options = broker.clientOptions();
    const args = JSON.stringify({ ...options, tls: options.tls && { ca: options.tls.ca?.toString() } });
    const dir = mkdtempSync(join(tmpdir(), "tidings-untraced-"));
    try {
      const preload = join(dir, "hide-opentelemetry.cjs");
      writeFileSync(preload, HIDE_OPENTELEMETRY);
      const { stdout } = await promisify(execFile)(process.execPath, ["--require", preload, UNTRACED, args], {
        timeout: 50_000,
      });
      assert.equal(stdout.trim(), "ok");
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }),
);
