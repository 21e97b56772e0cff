/**
 * Runs the real tidings broker binary for the tests: `TIDINGS_BIN`, or the
 * repository's `target/debug/tidings`, or `tidings` on `PATH`. Each broker
 * listens on 127.0.0.1 with port 0 (read from its first stdout line) and
 * keeps its data in a fresh temporary folder.
 */
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { TidingsClient } from "../../src/index.js";

const here = fileURLToPath(new URL(".", import.meta.url));
/** The repository root (this file runs from clients/typescript/dist/test/support). */
export const REPO = resolve(here, "../../../../..");

/** The broker binary under test. */
export function brokerBinary(): string {
  if (process.env.TIDINGS_BIN) return process.env.TIDINGS_BIN;
  const built = join(REPO, "target", "debug", "tidings");
  return existsSync(built) ? built : "tidings";
}

/** A running `tidings serve`. */
export interface Broker {
  /** `host:port`. */
  address: string;
  /** `http://host:port`, for `TidingsClient`. */
  url: string;
  /** Stops it with SIGTERM and resolves with its exit code. */
  stop(): Promise<number | null>;
}

/**
 * Waits until the broker answers a health check with SERVING. It prints its
 * address once bound, then opens its storage and installs its SIGTERM
 * handler; a SIGTERM before that would kill it outright.
 */
async function waitUntilServing(url: string): Promise<void> {
  const client = new TidingsClient({ baseUrl: url, timeoutMs: 1000 });
  try {
    const deadline = Date.now() + 20_000;
    for (;;) {
      try {
        if ((await client.health()) === "SERVING") return;
      } catch (e) {
        if (Date.now() > deadline) throw e;
      }
      if (Date.now() > deadline) throw new Error("the broker is not serving");
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  } finally {
    client.close();
  }
}

/** Starts a broker; rejects if it does not print its address within 20 s. */
export async function startBroker(...extra: string[]): Promise<Broker> {
  const dir = mkdtempSync(join(tmpdir(), "tidings-ts-"));
  const logPath = join(dir, "broker.log");
  const log = openSync(logPath, "w");
  const child: ChildProcess = spawn(
    brokerBinary(),
    [
      "serve",
      "--listen",
      "127.0.0.1:0",
      "--data-dir",
      join(dir, "db"),
      "--poll-interval",
      "100ms",
      "--maintenance-interval",
      "100ms",
      ...extra,
    ],
    { stdio: ["ignore", "pipe", log] },
  );
  closeSync(log);
  const exited = new Promise<number | null>((done) => child.once("exit", (code) => done(code)));
  const cleanup = () => rmSync(dir, { recursive: true, force: true });
  const lines = createInterface({ input: child.stdout! });
  const first = await new Promise<string>((done, fail) => {
    const timer = setTimeout(() => fail(new Error("the broker did not start within 20 s")), 20_000);
    lines.once("line", (line) => {
      clearTimeout(timer);
      done(line);
    });
    child.once("error", (e) => {
      clearTimeout(timer);
      fail(e);
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      fail(new Error(`the broker exited with ${code}: ${readFileSync(logPath, "utf8")}`));
    });
  }).catch((e) => {
    child.kill("SIGKILL");
    cleanup();
    throw e;
  });
  const prefix = "tidings listening on ";
  if (!first.startsWith(prefix)) throw new Error(`unexpected broker output: ${first}`);
  const address = first.slice(prefix.length).trim();
  await waitUntilServing(`http://${address}`).catch((e) => {
    child.kill("SIGKILL");
    cleanup();
    throw e;
  });
  return {
    address,
    url: `http://${address}`,
    async stop() {
      if (child.exitCode === null) child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
      const code = await exited;
      clearTimeout(timer);
      lines.close();
      cleanup();
      return code;
    },
  };
}
