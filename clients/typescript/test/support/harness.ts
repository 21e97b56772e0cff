/** Shared test helpers: a broker and a client per test. */
import assert from "node:assert/strict";
import { TidingsClient } from "../../src/index.js";
import { startBroker, type Broker } from "./broker.js";

/** Per-test time limit (ms) for node:test. */
export const TEST_TIMEOUT = 60_000;

/**
 * Runs `body` with a fresh broker (secured with `TIDINGS_TEST_SECURE=1`)
 * and a client connected to it with the mode's credentials, then closes
 * the client and checks the broker stops cleanly (exit code 0 on SIGTERM).
 */
export async function withBroker(body: (client: TidingsClient, broker: Broker) => Promise<void>): Promise<void> {
  const broker = await startBroker();
  const client = new TidingsClient({ ...broker.clientOptions(), timeoutMs: 10_000 });
  try {
    await body(client, broker);
  } finally {
    client.close();
    const code = await broker.stop();
    assert.equal(code, 0, "the broker exits cleanly");
  }
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

const decoder = new TextDecoder();

/** A payload as text. */
export function text(payload: Uint8Array): string {
  return decoder.decode(payload);
}
