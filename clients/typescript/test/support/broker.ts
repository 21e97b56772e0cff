/**
 * Runs the real tidings broker binary for the tests: `TIDINGS_BIN`, or the
 * repository's `target/debug/tidings`, or `tidings` on `PATH`. Each broker
 * listens on 127.0.0.1 with port 0 (read from its first stdout line) and
 * keeps its data in a fresh temporary folder.
 *
 * A broker may also serve TLS (certificates made by `clients/test-certs.sh`)
 * and access control (an access file written for it): see {@link Secure}.
 * With `TIDINGS_TEST_SECURE=1`, {@link startBroker} starts every broker so,
 * and its clients send an admin token ({@link ADMIN_TOKEN}) over TLS.
 */
import { execFileSync, spawn, type ChildProcess } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdtempSync, openSync, closeSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { TidingsClient, type ClientOptions } from "../../src/index.js";

const here = fileURLToPath(new URL(".", import.meta.url));
/** The repository root (this file runs from clients/typescript/dist/test/support). */
export const REPO = resolve(here, "../../../../..");

/** The broker binary under test. */
export function brokerBinary(): string {
  if (process.env.TIDINGS_BIN) return process.env.TIDINGS_BIN;
  const built = join(REPO, "target", "debug", "tidings");
  return existsSync(built) ? built : "tidings";
}

/** Whether every test's broker serves TLS and access control. */
export const SECURE_MODE = process.env.TIDINGS_TEST_SECURE === "1";
/** The token of the `tests` principal (admin) of {@link defaultAccess}. */
export const ADMIN_TOKEN = "tidings-test-admin-token";

/** A token as the access file lists it. */
export function tokenHash(token: string): string {
  return `sha256:${createHash("sha256").update(token).digest("hex")}`;
}

/** The access file of the secure mode: the test's client is admin. */
export function defaultAccess(): { principals: object[] } {
  return { principals: [{ name: "tests", tokens: [tokenHash(ADMIN_TOKEN)], admin: true }] };
}

/**
 * The files of `clients/test-certs.sh`: a CA, the broker's certificate
 * (localhost, 127.0.0.1), a client certificate (`client.tidings.test`) and
 * a CA that signed none of them.
 */
export interface Certs {
  ca: string;
  serverCert: string;
  serverKey: string;
  clientCert: string;
  clientKey: string;
  otherCa: string;
}

let certs: Certs | undefined;

/** The test certificates, made once per process (removed when it exits). */
export function testCerts(): Certs {
  if (!certs) {
    const dir = mkdtempSync(join(tmpdir(), "tidings-ts-certs-"));
    process.once("exit", () => rmSync(dir, { recursive: true, force: true }));
    execFileSync("bash", [join(REPO, "clients", "test-certs.sh"), dir], { stdio: ["ignore", "ignore", "inherit"] });
    certs = {
      ca: join(dir, "ca.pem"),
      serverCert: join(dir, "server.pem"),
      serverKey: join(dir, "server.key"),
      clientCert: join(dir, "client.pem"),
      clientKey: join(dir, "client.key"),
      otherCa: join(dir, "other-ca.pem"),
    };
  }
  return certs;
}

/** How a broker is secured. */
export interface Secure {
  /** The certificates it serves (TLS on) and whose CA signs client certificates; none: plain text. */
  certs?: Certs;
  /** `--tls-client-auth`: a token or a client certificate (`optional`, the default), or mutual TLS. */
  clientAuth?: "optional" | "required";
  /** The access file's content (default {@link defaultAccess}); `null`: no access control. */
  access?: object | null;
}

/** Options of {@link Broker.clientOptions}. */
export interface CredentialOptions {
  /** The token to send with access control (default {@link ADMIN_TOKEN}; `null`: none). */
  token?: string | null;
  /** Whether to show the client certificate (default: when the broker requires it). */
  mutual?: boolean;
}

/** A running `tidings serve`. */
export interface Broker {
  /** `host:port`. */
  address: string;
  /** `http://host:port`, or `https://host:port` with TLS, for `TidingsClient`. */
  url: string;
  /** How it is secured (`null`: plain text, no access control). */
  secure: Secure | null;
  /**
   * Options of a `TidingsClient` of this broker: its URL, TLS trusting the
   * test CA and, with access control, a token.
   */
  clientOptions(credentials?: CredentialOptions): ClientOptions;
  /** Stops it with SIGTERM and resolves with its exit code. */
  stop(): Promise<number | null>;
}

function clientOptions(url: string, secure: Secure | null, credentials: CredentialOptions = {}): ClientOptions {
  const options: ClientOptions = { baseUrl: url };
  if (secure?.certs) {
    const mutual = credentials.mutual ?? secure.clientAuth === "required";
    options.tls = { ca: readFileSync(secure.certs.ca) };
    if (mutual) {
      options.tls.cert = readFileSync(secure.certs.clientCert);
      options.tls.key = readFileSync(secure.certs.clientKey);
    }
  }
  const token = credentials.token === undefined ? ADMIN_TOKEN : credentials.token;
  if (secure && secure.access !== null && token !== null) options.token = token;
  return options;
}

/** The `serve` flags of a secured broker (writing its access file into `dir`). */
function secureFlags(secure: Secure | null, dir: string): string[] {
  if (!secure) return [];
  const flags: string[] = [];
  if (secure.certs) {
    flags.push("--tls-cert", secure.certs.serverCert, "--tls-key", secure.certs.serverKey);
    flags.push("--tls-ca", secure.certs.ca, "--tls-client-auth", secure.clientAuth ?? "optional");
  }
  if (secure.access !== null) {
    const accessFile = join(dir, "access.json");
    writeFileSync(accessFile, JSON.stringify(secure.access ?? defaultAccess()));
    flags.push("--access-file", accessFile);
  }
  return flags;
}

/**
 * Waits until the broker answers a health check with SERVING. It prints its
 * address once bound, then opens its storage and installs its SIGTERM
 * handler; a SIGTERM before that would kill it outright.
 */
async function waitUntilServing(options: ClientOptions): Promise<void> {
  const client = new TidingsClient({ ...options, timeoutMs: 1000 });
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

/**
 * Starts a broker (extra `serve` flags as arguments), secured as the mode
 * says; rejects if it does not print its address within 20 s.
 */
export function startBroker(...extra: string[]): Promise<Broker> {
  return startSecuredBroker(SECURE_MODE ? { certs: testCerts() } : null, ...extra);
}

/** Starts a broker secured by `secure` (`null`: plain text, no access control). */
export async function startSecuredBroker(secure: Secure | null, ...extra: string[]): Promise<Broker> {
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
      ...secureFlags(secure, dir),
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
  const url = `${secure?.certs ? "https" : "http"}://${address}`;
  // Health is open: no token needed, only the TLS settings.
  await waitUntilServing(clientOptions(url, secure, { token: null })).catch((e) => {
    child.kill("SIGKILL");
    cleanup();
    throw e;
  });
  return {
    address,
    url,
    secure,
    clientOptions: (credentials) => clientOptions(url, secure, credentials),
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
