/**
 * TLS, mutual TLS and bearer tokens against a broker with access control
 * (issue 12). These start their own secured brokers, whatever the mode.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { Code, ConnectError, TidingsClient, message, type ClientOptions } from "../src/index.js";
import {
  ADMIN_TOKEN,
  SECURE_MODE,
  defaultAccess,
  startBroker,
  startSecuredBroker,
  testCerts,
  tokenHash,
  type Broker,
  type Secure,
} from "./support/broker.js";
import { TEST_TIMEOUT, text } from "./support/harness.js";

const WRITER_TOKEN = "orders-writer-token";
const READER_TOKEN = "billing-reader-token";

/** The admin, a principal that may publish to `orders.*` and one that may consume `billing`. */
function accessWithRoles(): object {
  const access = defaultAccess();
  access.principals.push(
    { name: "orders-writer", tokens: [tokenHash(WRITER_TOKEN)], publish: ["orders.*"] },
    { name: "billing-reader", tokens: [tokenHash(READER_TOKEN)], consume: ["billing"] },
  );
  return access;
}

/** Asserts that `call` rejects with the gRPC status `code`. */
async function rejectsWith(call: Promise<unknown>, code: Code): Promise<void> {
  await assert.rejects(call, (e: unknown) => {
    assert.equal(Code[ConnectError.from(e).code], Code[code], ConnectError.from(e).message);
    return true;
  });
}

/**
 * Asserts that `call` fails in the TLS handshake: Connect-ES reports Node's
 * TLS error as `Internal`, its message naming the certificate problem.
 */
async function rejectsInHandshake(call: Promise<unknown>, problem: RegExp): Promise<void> {
  await assert.rejects(call, (e: unknown) => {
    const err = ConnectError.from(e);
    assert.equal(Code[err.code], Code[Code.Internal], err.message);
    assert.match(err.rawMessage, problem);
    return true;
  });
}

/**
 * Runs `body` with a broker secured by `secure` and clients made by
 * `connect` (closed afterwards); the broker must stop cleanly.
 */
async function withSecuredBroker(
  secure: Secure | null,
  body: (connect: (options?: ClientOptions) => TidingsClient, broker: Broker) => Promise<void>,
): Promise<void> {
  const broker = await startSecuredBroker(secure);
  const clients: TidingsClient[] = [];
  const connect = (options: ClientOptions = broker.clientOptions()) => {
    const client = new TidingsClient({ timeoutMs: 10_000, ...options });
    clients.push(client);
    return client;
  };
  try {
    await body(connect, broker);
  } finally {
    for (const client of clients) client.close();
    assert.equal(await broker.stop(), 0, "the broker exits cleanly");
  }
}

test("the suite's broker follows TIDINGS_TEST_SECURE", { timeout: TEST_TIMEOUT }, async () => {
  const broker = await startBroker();
  const anonymous = new TidingsClient(broker.clientOptions({ token: null }));
  try {
    assert.equal(broker.url.startsWith("https://"), SECURE_MODE);
    if (SECURE_MODE) await rejectsWith(anonymous.createTopic("t"), Code.Unauthenticated);
    else await anonymous.createTopic("t");
  } finally {
    anonymous.close();
    assert.equal(await broker.stop(), 0);
  }
});

test("a call without a token is Unauthenticated and health is open", { timeout: TEST_TIMEOUT }, () =>
  withSecuredBroker({ certs: testCerts() }, async (connect, broker) => {
    const anonymous = connect(broker.clientOptions({ token: null }));
    const unknown = connect(broker.clientOptions({ token: "not-a-known-token" }));
    assert.equal(await anonymous.health(), "SERVING");
    await rejectsWith(anonymous.createTopic("orders"), Code.Unauthenticated);
    await rejectsWith(unknown.createTopic("orders"), Code.Unauthenticated);
    const stream = anonymous.subscribe("billing");
    await rejectsWith(stream.receive(10_000), Code.Unauthenticated);
    await stream.close();
  }),
);

test("a principal without the right is PermissionDenied", { timeout: TEST_TIMEOUT }, () =>
  withSecuredBroker({ certs: testCerts(), access: accessWithRoles() }, async (connect, broker) => {
    const admin = connect();
    const writer = connect(broker.clientOptions({ token: WRITER_TOKEN }));
    const reader = connect(broker.clientOptions({ token: READER_TOKEN }));
    for (const topic of ["orders.eu", "payments"]) await admin.createTopic(topic);
    await admin.createSubscription("billing", "orders.eu", { start: "earliest" });
    await admin.createSubscription("audit", "payments", { start: "earliest" });

    // Unary calls: publish to orders.* only, and no admin.
    const [sent] = await writer.publish([message("orders.eu", "order 1")]);
    await rejectsWith(writer.publish([message("payments", "refund")]), Code.PermissionDenied);
    await rejectsWith(writer.createTopic("orders.us"), Code.PermissionDenied);
    await rejectsWith(reader.subscriptionStats("audit"), Code.PermissionDenied);

    // The token goes with the streams too.
    const publishing = writer.publishStream();
    const [streamed] = await publishing.publish([message("orders.eu", "order 2")]);
    await publishing.close();
    assert.equal(streamed.duplicate, false);
    const billing = reader.subscribe("billing");
    const delivery = await billing.receive(10_000);
    assert.equal(delivery?.id, sent.id);
    await delivery!.ack();
    await billing.close();
    const audit = reader.subscribe("audit");
    await rejectsWith(audit.receive(10_000), Code.PermissionDenied);
    await audit.close();
    assert.equal((await reader.subscriptionStats("billing")).acked, 1n);
  }),
);

test("a client certificate names the principal with mutual TLS", { timeout: TEST_TIMEOUT }, () => {
  const certs = testCerts();
  const access = { principals: [{ name: "billing", certificates: ["client.tidings.test"], admin: true }] };
  return withSecuredBroker({ certs, clientAuth: "required", access }, async (connect, broker) => {
    const client = connect({
      baseUrl: broker.url,
      tls: {
        ca: readFileSync(certs.ca),
        cert: readFileSync(certs.clientCert),
        key: readFileSync(certs.clientKey),
        serverName: "localhost",
      },
    });
    await client.createTopic("orders");
    await client.createSubscription("billing", "orders", { start: "earliest" });
    await client.publish([message("orders", "x")]);
    const stream = client.subscribe("billing");
    const delivery = await stream.receive(10_000);
    assert.equal(delivery && text(delivery.payload), "x");
    await stream.close();
    // Without a certificate the handshake is refused, token or not.
    const without = connect(broker.clientOptions({ mutual: false, token: ADMIN_TOKEN }));
    await rejectsInHandshake(without.health(), /certificate required/);
  });
});

for (const [name, tls, problem] of [
  ["another CA", () => ({ ca: readFileSync(testCerts().otherCa) }), /unable to verify/],
  ["Node's default roots", () => ({}), /unable to verify/],
  ["a wrong server name", () => ({ ca: readFileSync(testCerts().ca), serverName: "broker.internal" }), /altnames/],
] as const) {
  test(`a client that does not trust the broker fails: ${name}`, { timeout: TEST_TIMEOUT }, () =>
    withSecuredBroker({ certs: testCerts() }, async (connect, broker) => {
      const client = connect({ baseUrl: broker.url, tls: tls(), token: ADMIN_TOKEN });
      await rejectsInHandshake(client.health(), problem);
    }),
  );
}

test("a token over plain text reaches the broker", { timeout: TEST_TIMEOUT }, () =>
  withSecuredBroker({ access: accessWithRoles() }, async (connect, broker) => {
    assert.match(broker.url, /^http:\/\//);
    const admin = connect();
    const reader = connect(broker.clientOptions({ token: READER_TOKEN }));
    const anonymous = connect(broker.clientOptions({ token: null }));
    await admin.createTopic("orders.eu");
    await admin.createSubscription("billing", "orders.eu", { start: "earliest" });
    await admin.publish([message("orders.eu", "x")]);
    const stream = reader.subscribe("billing");
    const delivery = await stream.receive(10_000);
    assert.equal(delivery && text(delivery.payload), "x");
    await stream.close();
    await rejectsWith(reader.createTopic("t"), Code.PermissionDenied);
    await rejectsWith(anonymous.subscriptionStats("billing"), Code.Unauthenticated);
  }),
);

test("contradictory options are refused", () => {
  const ca = readFileSync(testCerts().ca);
  assert.throws(() => new TidingsClient({ baseUrl: "http://127.0.0.1:1", tls: { ca } }), /https:\/\//);
  assert.throws(
    () => new TidingsClient({ baseUrl: "https://127.0.0.1:1", tls: { cert: readFileSync(testCerts().clientCert) } }),
    /cert and key/,
  );
  assert.throws(() => new TidingsClient({ token: "" }), /empty/);
  const transport = createGrpcTransport({ baseUrl: "http://127.0.0.1:1" });
  assert.throws(() => new TidingsClient({ transport, token: "t" }), /transport/);
});
